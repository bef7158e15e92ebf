"""`vmhost demo` (`make demo`): the story of vmhost on one tiny VM, told
against the public API and the client, every step one printed line. See
story.py for the steps."""
from vmhost.demo.story import run_demo  # noqa: F401
