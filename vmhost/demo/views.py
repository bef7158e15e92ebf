"""The four views of the demo VM's chain (vmhost.testing.chains), and the
table that prints them side by side."""
from __future__ import annotations

from vmhost.demo.stage import DemoVm, VmActions
from vmhost.testing import chains

COLUMN = 24


def agent_chain(stage: VmActions, vm: DemoVm) -> list[str]:
    return chains.agent_chain(stage.client, vm.id)


def four_views(stage: VmActions, vm: DemoVm) -> dict[str, list[str]]:
    return chains.four_views(stage.client, stage.dom(vm), vm.id, stage.image_dir(vm.img))


def table(vm: DemoVm, views: dict[str, list[str]]) -> list[str]:
    """The views side by side, base first, one row per position in the chain."""
    rows = [" " * 4 + "".join(name.ljust(COLUMN) for name in views)]
    for n in range(max(len(chain) for chain in views.values())):
        cells = [vm.label(chain[n]) if n < len(chain) else "-" for chain in views.values()]
        rows.append(f"{n:<4}" + "".join(c.ljust(COLUMN) for c in cells))
    return rows
