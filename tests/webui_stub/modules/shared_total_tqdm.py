"""The console's "Total progress" bar across a job's images, with the real file's names and defaults: its total is
job_count × sampling_steps unless a script sets it (``updateTotal``), and the sampler advances it once a step."""

from modules import shared


class TotalTQDM:
    def __init__(self):
        self.bar = None  # {"total": …, "done": …} while open; the real one holds a tqdm.tqdm
        self.closed = []  # the bars closed so far, for tests

    def reset(self):
        self.bar = {"total": shared.state.job_count * shared.state.sampling_steps, "done": 0}

    def update(self):
        if self.bar is None:
            self.reset()
        self.bar["done"] += 1

    def updateTotal(self, new_total):
        if self.bar is None:
            self.reset()
        self.bar["total"] = new_total

    def clear(self):
        if self.bar is not None:
            self.closed.append(self.bar)
            self.bar = None
