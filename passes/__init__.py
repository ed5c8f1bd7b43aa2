"""oases_fx's graph passes, one file each. Installed as the package ``oases_fx.passes``.

A pass is ``name_pass(gm, *, options...) -> gm``; see passes/README.md for the contract and the
invariants each pass keeps.
"""
