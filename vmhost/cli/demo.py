"""`vmhost demo` (`make demo`): runs the story of vmhost/demo/story.py on a
stage of its own under `state_dir`, cleans up whatever happened, and exits 0
only if every check passed."""
from __future__ import annotations

from vmhost.demo.report import Report
from vmhost.demo.stage import Stage
from vmhost.demo.story import STEPS


def run_demo(state_dir: str, keep: bool = False) -> int:
    report, stage = Report(), Stage(state_dir)
    step = "setting up"
    try:
        stage.prepare()
        for step, fn in STEPS:
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
