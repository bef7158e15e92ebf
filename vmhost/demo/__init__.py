"""The story `vmhost demo` tells (story.py), on a stage of its own (stage.py),
with the four views of a chain (views.py) and its printed report (report.py);
the failover story of `vmhost demo --fleet` (fleet_story.py) on a lab of two
hosts (fleet_stage.py). The command itself: vmhost/cli/demo.py."""
