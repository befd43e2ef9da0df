"""docs/spec.md section 5.1, the smaller cases: the switch controls take their own arguments positionally, as the
README and docs/spec.md write them; a divergence is never negative; every file a run writes has the mode
open() gives. (Resuming a checkpoint without optimizer.pt: tests/faults/test_output_dirs.py.)"""

import os
import stat

import pytest
import torch
from faultlib import distill_argv, run_cli

from adaswitch import FixedSwitch, RandomSwitch
from adaswitch.ops import token_divergence
from adaswitch.train.atomic import file_mode


def test_switch_controls_take_their_own_arguments_positionally():
    fixed = FixedSwitch(12)
    assert fixed.position == 12 and fixed.switch_position == 12 and fixed.window == 8  # not window=12
    drawn = RandomSwitch((1, 2), (1, 1))
    assert drawn.positions == (1, 2) and drawn.weights == (1, 1) and drawn.window == 8 and drawn.k == 1.5
    assert FixedSwitch(3, window=2) == FixedSwitch(position=3, window=2)
    with pytest.raises(TypeError):
        FixedSwitch(3, 2)  # AdaSwitch's arguments by keyword only: a second number cannot bind silently


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"])
def test_divergence_of_equal_inputs_is_zero_not_negative(kind):
    """Rounding left jsd and the skew KLs of equal inputs near -1e-7: a floor F = 0 then refused the switch."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(512, 300, generator=g) * 10  # about -6e-8 (jsd) and -2e-8 (skew KLs) without the clamp
    d = token_divergence(logits, logits.clone(), kind, impl="torch")
    assert (d >= 0).all() and float(d.max()) < 1e-5
    assert torch.isnan(token_divergence(torch.full((1, 4), float("nan")), torch.zeros(1, 4), kind)).all()


def test_every_file_of_a_run_has_the_usual_mode(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(distill_argv(files, out), capsys)
    assert code == 0, err[-3000:]
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and "checkpoint-1/model.safetensors" in modes
    assert set(modes.values()) == {file_mode()}, modes  # the weights were 0600, every other file 0644
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no staging or temporary file left
