"""`vmhost demo` (`make demo`): runs the story of vmhost/demo/story.py on a
stage of its own under `state_dir`, cleans up whatever happened, and exits 0
only if every check passed. `vmhost demo --fleet` (`make demo-fleet`): the
same for the story of vmhost/demo/fleet_story.py, on a lab of two hosts."""
from __future__ import annotations

from vmhost.demo import fleet_story, story
from vmhost.demo.fleet_stage import FleetStage
from vmhost.demo.report import Report
from vmhost.demo.stage import Stage

DEFAULT_STATE_DIR = "/var/lib/vmhost-demo"
FLEET_STATE_DIR = "/var/lib/vmhost-demo-fleet"


def run_demo(state_dir: str | None = None, keep: bool = False, fleet: bool = False) -> int:
    if fleet:
        stage, steps = FleetStage(state_dir or FLEET_STATE_DIR), fleet_story.STEPS
    else:
        stage, steps = Stage(state_dir or DEFAULT_STATE_DIR), story.STEPS
    report = Report()
    step = "setting up"
    try:
        stage.prepare()
        for step, fn in steps:
            fn(stage, report)
    except (Exception, KeyboardInterrupt) as e:   # a step cannot go on: say so, clean up
        report.error(step, e)
    finally:
        report.section("clean-up")
        report.say(", ".join(stage.cleanup(keep_vm=keep)))
    if keep or report.failed:
        hint = f" (agent log: {stage.log_path})"
    else:
        stage.remove_state()
        hint = ""
    return report.summary(hint)
