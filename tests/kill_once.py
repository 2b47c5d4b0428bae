"""A datatrove step for the resume tests: it kills its own worker once, mid-task (imported by their scripts)."""

import os
import signal
from pathlib import Path

from datatrove.pipeline.base import PipelineStep


class KillOnce(PipelineStep):
    """Passes documents on; the first time task `rank` runs, SIGKILLs its own process after `after` documents (the
    `marker` file records that it did, so the rerun passes)."""

    name = "kill once"

    def __init__(self, marker: str, rank: int = 2, after: int = 5):
        super().__init__()
        self.marker, self.kill_rank, self.after = Path(marker), rank, after

    def run(self, data, rank: int = 0, world_size: int = 1):
        for count, document in enumerate(data):
            if rank == self.kill_rank and count == self.after and not self.marker.exists():
                self.marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            yield document
