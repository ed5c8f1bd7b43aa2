"""python -m oases_fx {demo,plan} ..."""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m oases_fx {demo,plan} [options]\n"
              "  demo  train a small GPT with TP on CPU gloo ranks, show plan + schedule, check vs unsharded\n"
              "  plan  plan a named model config without training")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from oases_fx.demo import main as demo_main

        return demo_main(rest)
    if cmd == "plan":
        from oases_fx.cli import plan_main

        return plan_main(rest)
    print(f"unknown command {cmd!r}; expected demo or plan", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
