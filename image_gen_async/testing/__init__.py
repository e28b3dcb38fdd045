"""An in-process emulator of the four provider APIs, for tests, benchmarks and demos.

Use ``async with Emulator(EmulatorConfig(duration=0.05)) as emu:``, point clients at
``emu.url``, then assert on ``emu.stats``; see `_emulator` for markers and faults.
"""

from ._emulator import Emulator
from ._png import make_png
from ._process import EmulatorProcess
from ._state import EmulatorConfig, EmuTask, Faults, RecordedRequest, Stats

__all__ = [
    "EmuTask",
    "Emulator",
    "EmulatorConfig",
    "EmulatorProcess",
    "Faults",
    "RecordedRequest",
    "Stats",
    "make_png",
]
