"""Run by the distributed tests under `accelerate launch`: train a YAML config, then save this
process's adapter weights (whole), so the test can compare ranks with each other and with one process,
and what this process held of the frozen base (its bytes, and all of its bytes when whole)."""

import sys

import torch
from peft import get_peft_model_state_dict

from peftkit import Config, PreferenceTrainer, Trainer, sharding


def local_bytes(tensor) -> int:
    local = tensor.to_local() if sharding.is_dtensor(tensor) else tensor
    return local.numel() * local.element_size()


class FrozenBytes:
    """At the end of training, before the kept adapter is saved: the trained (maybe sharded) model's frozen base."""

    def on_train_end(self, trainer):
        frozen = [p for p in trainer.forward.parameters() if not p.requires_grad]
        self.held = sum(local_bytes(p) for p in frozen)
        self.whole = sum(p.numel() * p.element_size() for p in frozen)


config = Config.from_yaml(sys.argv[1]).override(sys.argv[3:])
frozen = FrozenBytes()
trainer = (PreferenceTrainer if config.train.objective == "dpo" else Trainer)(
    config, callbacks=[frozen], log=lambda _: None
)
trainer.fit()
rank = trainer.accelerator.process_index
state = {
    k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model)).items()
}
torch.save(
    {
        "world": trainer.accelerator.num_processes,
        "sharded": trainer.sharded,
        "frozen_bytes": frozen.held,
        "frozen_bytes_whole": frozen.whole,
        "state": state,
    },
    f"{sys.argv[2]}/rank{rank}.pt",
)
