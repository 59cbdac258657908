"""A step's inputs travel in one buffer (engine/staging.py): each field must land where the step reads it,
and on a GPU the host side must not be rewritten while its last copy is still queued."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.staging import Staging, StepInputs


def test_fields_round_trip_through_one_buffer() -> None:
    """Tokens, base, positions and mask read back from the device views as written, a new layout after the
    first too: catches overlapping fields or views cut at the wrong offsets."""
    T = 5
    rel = torch.arange(T) * 3
    local = torch.rand(T, T) > 0.5
    inputs = StepInputs(rel, local, torch.device("cpu"))
    assert inputs.rel_pos.tolist() == rel.tolist() and torch.equal(inputs.local, local)
    inputs.send([7, 8, 9, 10, 11], 1234)
    assert inputs.tokens.tolist() == [7, 8, 9, 10, 11] and int(inputs.base) == 1234
    new_local = ~local
    inputs.set_layout(np.array([0, 1, 2, 2, 3]), new_local.numpy())
    inputs.send([1, 2, 3, 4, 5], 99)
    assert inputs.rel_pos.tolist() == [0, 1, 2, 2, 3] and torch.equal(inputs.local, new_local)
    assert inputs.tokens.tolist() == [1, 2, 3, 4, 5] and int(inputs.base) == 99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_host_side_waits_for_its_queued_copy() -> None:
    """With the stream busy, a second write must wait until the first copy ran: catches a guard that lets
    back-to-back steps of one shape (prefill chunks) overwrite inputs the GPU has not read yet."""
    staging = Staging(8, torch.device("cuda"))
    torch.cuda._sleep(200_000_000)  # keep the stream busy: the copy below runs after this
    staging.writable()[:] = 1
    staging.send()
    staging.writable()[:] = 2  # waits for the copy of the ones
    torch.cuda.synchronize()
    assert staging.device.tolist() == [1] * 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inputs_wait_for_the_step_that_copies_them() -> None:
    """A step copies its own inputs when the GPU reaches it (`StepInputs.receive`): the next `send` must not
    rewrite them before that. Catches a guard that lets a second step's tokens overwrite the first's while the
    first step is still queued behind other work: it would then read the second step's tokens."""
    inputs = StepInputs(torch.arange(3), torch.ones(3, 3, dtype=torch.bool), torch.device("cuda"))
    torch.cuda._sleep(200_000_000)  # keep the stream busy: the first step's copy runs after this
    inputs.send([1, 2, 3], 10)
    inputs.receive()
    seen = inputs.tokens.clone()  # what the first step read, taken right after its copy
    inputs.step_queued()  # as `Runner.step` says once it has queued a step
    inputs.send([4, 5, 6], 11)  # waits for the first step's copy
    inputs.receive()
    torch.cuda.synchronize()
    assert seen.tolist() == [1, 2, 3] and inputs.tokens.tolist() == [4, 5, 6] and int(inputs.base) == 11
