"""The story `vmhost demo` tells (story.py), on a stage of its own (stage.py),
with the four views of a chain (views.py) and its printed report (report.py).
The command itself: vmhost/cli/demo.py."""
