"""--torch_compile: a model with LoRA hooks compiles as one graph and computes what it computed."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.errors import UserError
from lora_trainer.models.checkpoint import load_checkpoint
from lora_trainer.networks.network import create_network
from lora_trainer.networks.spec import NetworkSpec, spec_from_kohya
from lora_trainer.tiny_model.build import TINY_MODEL_PATH
from lora_trainer.training.trainer import compile_models


@pytest.mark.parametrize("network_module, network_args", [
    ("networks.lora", []),
    ("lycoris.kohya", ["algo=loha"]),
    ("lycoris.kohya", ["algo=lokr", "use_scalar=True"]),
    ("lycoris.kohya", ["algo=locon", "dora_wd=True"]),
    ("lycoris.kohya", ["algo=ia3"]),
    ("lycoris.kohya", ["algo=diag-oft"]),
], ids=["lora", "loha", "lokr-scalar", "dora", "ia3", "oft"])
def test_a_text_encoder_with_a_network_compiles_without_graph_breaks_and_gives_the_same_states_and_gradients(
        network_module, network_args):
    """The text encoder stands for the UNet here (same network layers, a fraction of the tracing time on a CPU)."""
    import torch._dynamo

    model = load_checkpoint(TINY_MODEL_PATH)
    model.unet = torch.nn.Identity()  # compile_models compiles every part; only the text encoder is run here
    network = create_network(model.config, None, model.text_encoders, spec_from_kohya(network_module, 4, 2, network_args),
                             train_unet=False)
    with torch.no_grad():
        for parameter in network.parameters():  # a trained network: its change is not zero
            parameter.add_(torch.randn_like(parameter) * 0.02)
    network.apply_to()
    encoder = model.text_encoders[0]
    tokens = torch.randint(0, 49407, (2, 77))

    def states_and_gradient():
        network.zero_grad()
        states = encoder(tokens).hidden
        states.square().mean().backward()
        return states.detach(), next(network.parameters()).grad.clone()

    eager = states_and_gradient()
    # one graph: a break (e.g. a Python number read from a tensor in each layer, as α/r and LyCORIS's alpha were)
    # recompiles per layer shape on a real model until dynamo gives up, and on a GPU waits for the device in every layer
    assert torch._dynamo.explain(encoder)(tokens).graph_break_count == 0
    compile_models(model, "eager")
    compiled = states_and_gradient()
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])


def test_a_backend_this_pytorch_lacks_is_named_with_the_ones_it_has(monkeypatch):
    import torch._dynamo

    # which backends exist depends on what is installed (onnxrt appears with onnxruntime): fix the list
    monkeypatch.setattr(torch._dynamo, "list_backends", lambda exclude_tags=(): ["cudagraphs", "eager", "inductor", "tvm"])
    model = load_checkpoint(TINY_MODEL_PATH)
    with pytest.raises(UserError, match=r"--dynamo_backend onnxrt is not available with this PyTorch; choose one of "
                                        r"eager, inductor, cudagraphs, tvm$"):
        compile_models(model, "onnxrt")


@pytest.mark.parametrize("slow_tracer, warned", [(True, True), (False, False)], ids=["torch-2.1", "torch-2.2+"])
def test_compiling_under_a_torch_that_traces_for_minutes_says_so_before_the_run_seems_stalled(monkeypatch, slow_tracer,
                                                                                             warned):
    from lora_trainer.training import trainer
    from lora_trainer.training.options import options_from

    monkeypatch.setattr(trainer, "DYNAMO_TRACES_SLOWLY", slow_tracer)
    options = options_from({"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d",
                            "torch_compile": True})
    warnings = trainer._option_warnings(options, NetworkSpec(), torch.device("cpu"), torch.float32)
    assert any("traces a UNet with a network for minutes" in w and torch.__version__ in w for w in warnings) is warned
    assert not any("minutes" in w for w in trainer._option_warnings(
        options_from({"pretrained_model_name_or_path": "m", "train_data_dir": "d"}), NetworkSpec(), torch.device("cpu"),
        torch.float32))


def test_compiling_on_a_gpu_says_the_first_step_waits_for_the_compiler(monkeypatch):
    """Measured on a lent H200 (torch 2.11): inductor had not compiled an SD1.5 UNet with a LoRA after 3.5 minutes."""
    from lora_trainer.training import trainer
    from lora_trainer.training.options import options_from

    monkeypatch.setattr(trainer, "DYNAMO_TRACES_SLOWLY", False)
    def warnings(device: str, **options) -> list[str]:
        chosen = options_from({"pretrained_model_name_or_path": "m", "train_data_dir": "d", **options})
        return [w for w in trainer._option_warnings(chosen, NetworkSpec(), torch.device(device), torch.float32)
                if "compil" in w]

    assert warnings("cuda", torch_compile=True) == [
        "--torch_compile on CUDA: inductor compiles the UNet with its network before the first step, which takes "
        "minutes on a full-size model (an SD1.5 UNet with a LoRA had not finished after 3.5 minutes on an H200 under "
        "torch 2.11), so the run looks stalled until then"]
    assert warnings("cpu", torch_compile=True) == [] and warnings("cuda") == []
    assert warnings("cuda", torch_compile=True, dynamo_backend="eager") == []  # no code generated
