"""The application layer: config, THE registry (name → method), experiments, ``datatrace
evaluate``, the HTML report, the command line and the demo. Nothing below imports it."""
