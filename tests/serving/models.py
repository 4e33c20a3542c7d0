"""Factories the serving tests start servers with (imported by the server process)."""

from torch import nn


class Net(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = self.conv(x).relu().mean((2, 3))
        return self.fc(h)


def net():
    return Net()


class TwoInputs(nn.Module):
    """Like a text model: input_ids and attention_mask by name, a ModelOutput-like dict out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask):
        h = self.proj(self.emb(input_ids)) * attention_mask.unsqueeze(-1).float()
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1).float()
        return {"logits": self.head(pooled), "hidden": (h, pooled)}


def two_inputs():
    return TwoInputs()


def slow(delay="0.05"):
    """A Net whose forward sleeps (for queue and drain tests)."""
    import time

    import torch

    class Slow(Net):
        def forward(self, x):
            # the sleep is a Python side effect, which a captured graph (liedeploy.core.conv_graph) would
            # not replay: branching on the input's values keeps torch.export out, so it runs as modules
            if bool(torch.isfinite(x).all()):
                time.sleep(float(delay))
            return super().forward(x)

    return Slow()


class Tokens(nn.Module):
    """A BERT-like model: INT64 token ids looked up in an embedding of 100 rows."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, input_ids):
        return self.fc(self.emb(input_ids).mean(1))


def tokens():
    return Tokens()


class Picky(Net):
    """A Net whose forward refuses inputs above 1e6 (a model fault that no spec can foresee)."""

    def forward(self, x):
        if bool((x > 1e6).any()):
            raise ValueError("input out of the range this model was trained on")
        return super().forward(x)


def picky():
    return Picky()


THREADS: dict = {"built": set(), "forward": set()}


class ThreadRecorder(Net):
    """A Net that records which threads build and run it (the compute-thread layout test)."""

    def forward(self, x):
        import threading

        THREADS["forward"].add(threading.get_ident())
        return super().forward(x)


def thread_recorder():
    import threading

    THREADS["built"].add(threading.get_ident())
    return ThreadRecorder()
