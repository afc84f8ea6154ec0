"""Run by the distributed tests under `accelerate launch`: train a YAML config, then save this
process's adapter weights, so the test can compare ranks with each other and with one process."""

import sys

import torch
from peft import get_peft_model_state_dict

from peftkit import Config, Trainer

config = Config.from_yaml(sys.argv[1]).override(sys.argv[3:])
trainer = Trainer(config, log=lambda _: None)
trainer.fit()
rank = trainer.accelerator.process_index
state = {
    k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model)).items()
}
torch.save({"world": trainer.accelerator.num_processes, "state": state}, f"{sys.argv[2]}/rank{rank}.pt")
