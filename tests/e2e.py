"""Shared pieces of the end-to-end tests: a reduced model on small generated images."""
import torch

import main as train_main
from util.resume import parse_args

# A reduced model and small images, so that an epoch takes seconds on two cores.
TINY = ["--backbone", "resnet18", "--no_pretrained_backbone", "--device", "cpu", "--num_classes", "4",
        "--enc_layers", "1", "--dec_layers", "2", "--hidden_dim", "64", "--nheads", "4",
        "--dim_feedforward", "128", "--num_queries", "20", "--scales", "96", "112", "128",
        "--max_size", "160", "--val_size", "128", "--num_workers", "0", "--batch_size", "2",
        "--print_freq", "2", "--dropout", "0"]


def parse(*flags):
    """TINY plus `flags` parsed as main.py's command line (the flags given are recorded)."""
    return parse_args(train_main.get_args_parser(), TINY + [str(f) for f in flags])


def run_main(*flags):
    """main.main() in this process with TINY plus `flags`; returns its stats."""
    return train_main.main(parse(*flags))


class CallCounter(torch.nn.Module):
    """Stands in for a compiled model (main.compile_model's result): calls the model, counts the calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, samples):
        self.calls += 1
        return self.model(samples)
