"""Non-finite values injected into a batch's loss or into the gradients alone are caught by
`train.on_nonfinite` (stop names the step and the last good checkpoint, without guessing at
a cause; skip leaves the parameters untouched); loss spikes are logged."""

import jax.numpy as jnp
import numpy as np
import pytest

import nvium_jax.data.loader
import nvium_jax.train.step
from nvium_jax.cli import main
from nvium_jax.train.loop import NonFiniteLoss, train
from tests.faults.conftest import metrics_rows, small_config, train_losses, write_yaml

MARKER = 319  # an id the 300-token tokenizer never produces: it marks the batch to poison


def poison_batches(monkeypatch, at_steps):
    """Batch number s (1-based) of `at_steps` carries MARKER as its first token."""
    nxt = nvium_jax.data.loader.TrainBatches.__next__

    def next_batch(self):  # counted per loader: every train() starts its own
        batch = nxt(self).copy()
        self.served = getattr(self, "served", 0) + 1
        if self.served in at_steps:
            batch[0, 0] = MARKER
        return batch

    monkeypatch.setattr(nvium_jax.data.loader.TrainBatches, "__next__", next_batch)


def patch_loss(monkeypatch, how):
    """The loss (or only its gradient) of a marked batch becomes NaN, or 20× (a spike)."""
    loss_fn = nvium_jax.train.step.nvium_loss

    def patched(model, tokens_BxT1, **kwargs):
        metrics = loss_fn(model, tokens_BxT1, **kwargs)
        marked = jnp.any(tokens_BxT1 == MARKER)
        if how == "loss":
            loss = jnp.where(marked, jnp.nan, metrics.loss)
        elif how == "gradient":  # finite value, NaN gradient: x + 0·(NaN·x) has value x
            poison = jnp.where(marked, jnp.nan, 0.0) * metrics.mixture_ce
            loss = metrics.loss + jnp.where(marked, poison - jax_stop(poison), 0.0)
        else:
            loss = jnp.where(marked, 20 * metrics.loss, metrics.loss)
        return metrics._replace(loss=loss)

    monkeypatch.setattr(nvium_jax.train.step, "nvium_loss", patched)


def jax_stop(x):
    import jax

    return jax.lax.stop_gradient(x)


@pytest.mark.parametrize("how", ["loss", "gradient"])
def test_stop_names_the_step_and_the_last_good_checkpoint(fault_data, tmp_path, monkeypatch, capsys, how):
    poison_batches(monkeypatch, {6})
    patch_loss(monkeypatch, how)
    config = small_config(fault_data, tmp_path / "run", "train.steps=12")
    if how == "loss":  # through the CLI: one line, exit status 1
        assert main(["train", "--config", str(write_yaml(config, tmp_path / "c.yaml"))]) == 1
        message = capsys.readouterr().err.strip().splitlines()[-1].removeprefix("error: ")
    else:
        with pytest.raises(NonFiniteLoss) as caught:
            train(config)
        message = str(caught.value)
    assert message.startswith("non-finite loss at step 6; stopped without saving it — the last good "
                              "checkpoint is step 4; set train.on_nonfinite=skip")
    assert "lr" not in message  # no guess at a cause


def test_skip_leaves_the_parameters_and_counts_the_step(fault_data, tmp_path, monkeypatch):
    poison_batches(monkeypatch, {6})
    patch_loss(monkeypatch, "gradient")
    train(small_config(fault_data, tmp_path / "run", "train.steps=8", "train.on_nonfinite=skip"))
    rows = {r["step"]: r for r in metrics_rows(tmp_path / "run") if "loss" in r}
    assert rows[5]["skipped"] == 0 and rows[6]["skipped"] == 1 and rows[8]["skipped"] == 1
    assert np.isfinite([rows[s]["loss"] for s in (7, 8)]).all()


def test_loss_spikes_are_logged(fault_data, tmp_path, monkeypatch, capfd):
    poison_batches(monkeypatch, {26})
    patch_loss(monkeypatch, "spike")
    train(small_config(fault_data, tmp_path / "run", "train.steps=30", "train.log_every=10",
                       "train.eval_every=100", "train.checkpoint_every=100"))
    assert "loss spike at step 26" in capfd.readouterr().err
    spikes = [r for r in metrics_rows(tmp_path / "run") if "loss_spike_steps" in r]
    assert [r["loss_spike_steps"] for r in spikes] == [[26]]
    assert set(train_losses(tmp_path / "run")) == {10, 20, 30}  # the spike rides on its sync row
