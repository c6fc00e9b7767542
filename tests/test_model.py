"""littune/model.py: activation checkpointing (`checkpoint_activations`, `finetune --activation_checkpointing`) gives
the loss and gradients of the plain forward, for adapter_v2 (whose cached prefix K/V must not break the
recomputation) and LoRA, and the same trained weights through the real CLI."""

import pytest
import torch

from conftest import finetune_argv, max_diff
from littune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def loss_and_gradients(checkpoint, method_name: str, checkpointing: bool, ids: torch.Tensor):
    from littune.checkpoints import load_model_config
    from littune.methods import get_method
    from littune.model import checkpoint_activations, forward_loss_sum

    method = get_method(method_name)
    args = method.args(lora_dropout=0.0) if method_name == "lora" else method.args()
    torch.manual_seed(0)
    model = method.build_model(load_model_config(checkpoint), args)
    model.load_state_dict(torch.load(checkpoint / "lit_model.pth", weights_only=True), strict=False)
    with torch.no_grad():  # trained-looking method weights, so that every gradient path carries signal
        for name, p in model.named_parameters():
            if method.is_trainable(name):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    for name, p in model.named_parameters():
        p.requires_grad_(method.is_trainable(name))
    if checkpointing:
        checkpoint_activations(model, method.block_class, method.before_forward)
    labels = ids.clone()
    labels[:, :5] = -100
    method.before_forward(model)
    loss = forward_loss_sum(model, ids, labels, -100)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method_name", ["adapter_v2", "lora"])
def test_checkpointed_blocks_give_the_plain_loss_and_gradients(small_checkpoint, method_name):
    ids = torch.randint(0, 500, (3, 40), generator=torch.Generator().manual_seed(1))
    plain_loss, plain = loss_and_gradients(small_checkpoint, method_name, False, ids)
    loss, grads = loss_and_gradients(small_checkpoint, method_name, True, ids)
    assert torch.allclose(loss, plain_loss, rtol=1e-6, atol=0)
    assert grads.keys() == plain.keys() and len(grads) > 4
    for name, grad in grads.items():
        assert grad is not None and plain[name] is not None, name
        scale = plain[name].abs().max().item()
        assert max_diff(grad, plain[name]) <= 1e-5 * max(scale, 1e-12), name
    # the adapter_v2 prefix (adapter_wte) gets its gradient through the recomputed blocks too
    if method_name == "adapter_v2":
        assert any("adapter_wte" in n and g.abs().sum() > 0 for n, g in grads.items())


@pytest.mark.parametrize("method_name", ["adapter_v2", "lora"])
def test_finetune_with_activation_checkpointing_trains_the_same_weights(small_checkpoint, alpaca64, tmp_path,
                                                                        method_name, capsys):
    def run(out, *flags) -> dict:
        args = finetune_argv(small_checkpoint, alpaca64, out, "--max_steps", "2", "--micro_batch_size", "2",
                             "--batch_size", "4", "--eval_interval", "2", "--eval_iters", "1", "--shared_prefix",
                             "false", *flags, method=method_name)
        if method_name == "lora":
            args += ["--lora_dropout", "0"]
        assert main(args) == 0
        return torch.load(next(out.glob("lit_model_*_finetuned.pth")), weights_only=True)

    plain = run(tmp_path / "plain")
    capsys.readouterr()
    checkpointed = run(tmp_path / "checkpointed", "--activation_checkpointing", "true")
    assert checkpointed.keys() == plain.keys()
    for name in plain:
        assert max_diff(checkpointed[name], plain[name]) <= 1e-5 * max(plain[name].abs().max().item(), 1e-12), name
