"""--gradient_accumulation_steps as sd-scripts (accelerate) does it: which batches make up an optimizer step, and
that step's gradient is the mean over every sample it took.

The training loop and the backward pass are the trainer's own; what they drive (the UNet's losses, the optimizer)
is stood in for, so these run in milliseconds instead of training the tiny model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from lora_trainer.training.distributed import World
from lora_trainer.training.trainer import NetworkGradScaler, RunState, TrainingRun


def _bare_run(**attributes) -> TrainingRun:
    run = object.__new__(TrainingRun)  # no model, data or optimizer: the test gives what the method reads
    run.__dict__.update(attributes)
    return run


def _steps_taken(batches_per_epoch: int, accumulation: int, epochs: int) -> list[tuple]:
    """What the loop does, in order: ("learn", epoch, batch), ("step", epoch), ("end", epoch)."""
    done: list[tuple] = []
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    state = RunState()

    def step(epoch):
        state.step += 1
        done.append(("step", epoch))

    def end_epoch(epoch):
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        done.append(("end", epoch))

    run = _bare_run(
        options=SimpleNamespace(sample_at_first=False, gradient_accumulation_steps=accumulation, max_data_loader_n_workers=0),
        state=state, generator=torch.Generator(), num_epochs=epochs, total_steps=epochs * steps_per_epoch,
        data=SimpleNamespace(epoch_batches=lambda epoch: list(range(batches_per_epoch)),
                             loaded=lambda batches, workers: iter(batches)),
        _learn=lambda batch, epoch: done.append(("learn", epoch, batch)), _step=step, _obey=lambda epoch: None,
        _end_epoch=end_epoch, finish=lambda epoch, stopped=False: [],
    )
    run.train()
    return done


def test_an_epoch_whose_last_batches_do_not_fill_an_accumulation_still_ends_with_their_step():
    """5 batches at 2 per step: steps after batches 2, 4 and 5, as accelerate steps at the end of the data; the
    odd batch's gradient must not carry over into the next epoch's first step (nor the run end a step short)."""
    taken, learn = _steps_taken(5, 2, 2), [("learn", 0, b) for b in range(5)]
    assert taken[:9] == [*learn[:2], ("step", 0), *learn[2:4], ("step", 0), learn[4], ("step", 0), ("end", 0)]
    assert [entry for entry in taken if entry[0] == "step"] == [("step", 0)] * 3 + [("step", 1)] * 3


def test_an_accumulated_step_has_the_mean_gradient_of_every_sample_it_took(monkeypatch):
    """Each batch's loss counts 1/accumulation: two batches of 4 give the gradient of the mean over the 8 samples,
    as one batch of 8 would. A sum would make every step under SGD or --max_grad_norm clipping 2× too large."""
    from lora_trainer.training import trainer

    weight = torch.zeros(3, requires_grad=True)
    # a sample's loss is its value times the weights' sum, so its gradient is its value on every weight
    monkeypatch.setattr(trainer, "_training_step", lambda batch, *rest: batch.values[rest[-2]] * weight.sum())
    run = _bare_run(
        options=SimpleNamespace(gradient_accumulation_steps=2), world=World(), state=RunState(), total_steps=1,
        network=SimpleNamespace(set_multiplier=lambda multiplier: None),
        data=SimpleNamespace(network_multiplier=lambda batch: 1.0), model=None, tokenizer=None,
        config=SimpleNamespace(schedule=SimpleNamespace(alphas_cumprod=None), prediction_type="epsilon"), generator=None,
        device=torch.device("cpu"), weight_dtype=torch.float32, train_te=False, text_cache=None,
        scaler=NetworkGradScaler("cpu", enabled=False), _step_losses=[], _losses_since_step=[],
    )
    for values in ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]):
        batch = SimpleNamespace(values=torch.tensor(values), records=[SimpleNamespace(path=f"{v}.png") for v in values])
        run._learn(batch, 0)
    torch.testing.assert_close(weight.grad, torch.full((3,), 4.5))  # mean of 1 … 8
