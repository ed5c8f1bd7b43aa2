"""The Oases planner: profile the device, model overlapped execution, search the strategy."""
