"""transformers ``Trainer`` integration: adapter files at every save (needs ``transformers``).

    from liedeploy.hf_trainer import LieAdapterCallback
    apply_adapters_(model, LieConfig(r=8, targets="all-linear", modules_to_save=["classifier"]))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LieAdapterCallback()])
    trainer.train()                              # checkpoint-N/lie_adapter.safetensors at each save
    trainer.train(resume_from_checkpoint=True)   # continues the same adapter (factors and heads)

The Trainer's own checkpoint holds the whole model state (factors included), so resuming restores
the adapter exactly; the callback adds the small adapter file (factors + full tensors) beside it,
and one in ``output_dir`` when training ends.
"""

from __future__ import annotations

import os

from liedeploy.core.adapter_file import save_adapter
from liedeploy.errors import require

__all__ = ["LieAdapterCallback", "ADAPTER_FILE"]

ADAPTER_FILE = "lie_adapter.safetensors"

_transformers = require("transformers", "dev", "liedeploy.hf_trainer")


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return model


class LieAdapterCallback(_transformers.TrainerCallback):
    """Write the model's adapter file at every Trainer save and at the end of training.

    Args:
        filename: the file name inside each ``checkpoint-N`` folder (and ``output_dir``).
        name: the task name stored in the file (default: the ``output_dir``'s folder name).
    """

    def __init__(self, filename: str = ADAPTER_FILE, name: str | None = None):
        self.filename, self.name = filename, name

    def _save(self, folder: str, model) -> None:
        os.makedirs(folder, exist_ok=True)
        save_adapter(_unwrap(model), os.path.join(folder, self.filename),
                     name=self.name or os.path.basename(os.path.normpath(folder)))

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            folder = os.path.join(args.output_dir, f"{_transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self._save(folder, model)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            self._save(args.output_dir, model)
        return control
