"""Wise-SrNet head, the head family and the MONAI backbones."""

import re

import pytest
import torch
from monai.networks.nets import DenseNet121

from wsr_med.networks import (
    HEADS,
    HeadEvidence,
    WiseSrNet,
    WiseSrNetHead,
    attach_constraints,
    default_pre_pool,
    load_pretrained_weights,
    project_constraints_,
    strongest_point,
    to_source_pixels,
    warm_start_batchnorm,
)
from wsr_med.errors import WsrMedError
from wsr_med.pipelines.bench_batchnorm import train_briefly

TINY_DENSENET = {"init_features": 8, "growth_rate": 4, "block_config": [1, 1, 1, 1]}


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "channels, img, pool, kernel, expected",
    [(1024, 224, 2, 3, 1024 * 9 + 1024), (2048, 512, 3, 5, 2048 * 25 + 2048)],
)
def test_depthwise_parameter_arithmetic_matches_paper(channels, img, pool, kernel, expected):
    head = WiseSrNetHead(channels, [img // 32] * 2, out_channels=2)
    assert head.compression.pre_pool == (pool, pool)
    assert head.compression.kernel_size == (kernel, kernel)
    assert n_params(head.compression) == expected


def test_densenet121_reference_sizes():
    for img, kernel in [(224, 3), (512, 5)]:
        net = WiseSrNet("densenet121", img_size=img)
        assert net.head.compression.kernel_size == (kernel, kernel)
        assert n_params(net.head.compression) == 1024 * kernel * kernel + 1024


def test_pre_pool_rule_for_other_sizes_and_override():
    assert default_pre_pool([32]) == (5,)  # 1024 px -> 32 -> 6
    assert default_pre_pool([4, 8, 64]) == (1, 2, 10)  # anisotropic / 3D: each axis alone
    net = WiseSrNet(img_size=[64, 128], head="wise", head_kwargs={"pre_pool": 1}, backbone_kwargs=TINY_DENSENET)
    assert net.head.compression.kernel_size == (2, 4)


def test_projection_after_steps_that_push_weights_negative():
    torch.manual_seed(0)
    net = WiseSrNet(img_size=64, out_channels=2, backbone_kwargs=TINY_DENSENET)
    depthwise = net.head.compression.depthwise
    optimizer = torch.optim.SGD(net.parameters(), lr=10.0)
    attach_constraints(optimizer, net)
    x = torch.rand(2, 1, 64, 64)
    for _ in range(3):
        optimizer.zero_grad()
        bias_before = depthwise.bias.detach().clone()
        # gradient of +sum(w) pushes every weight down, and the bias with it
        (net(x).sum() * 0 + depthwise.weight.sum() * 100 + depthwise.bias.sum() * 100).backward()
        optimizer.step()
        assert depthwise.weight.min() >= 0
        assert (depthwise.weight == 0).float().mean() > 0.99
        assert (depthwise.bias < bias_before).all()  # unconstrained: still moved, may be negative
    assert (depthwise.bias < 0).all()


def test_unconstrained_heads_keep_negative_weights():
    for head in ("wise_unconstrained", "depthwise"):
        net = WiseSrNet(img_size=64, head=head, backbone_kwargs=TINY_DENSENET)
        project_constraints_(net)
        assert net.head.compression.depthwise.weight.min() < 0


@pytest.mark.parametrize("backbone", ["densenet121", "efficientnet-b0"])
@pytest.mark.parametrize("spatial_dims, size", [(2, 64), (3, 32)])
def test_forward_2d_3d(backbone, spatial_dims, size):
    kwargs = {"backbone_kwargs": TINY_DENSENET} if backbone.startswith("densenet") else {}
    net = WiseSrNet(backbone, spatial_dims=spatial_dims, in_channels=1, out_channels=3, img_size=size, **kwargs).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, *[size] * spatial_dims))
    assert out.shape == (2, 3)


@pytest.mark.parametrize("head", HEADS)
def test_every_head_trains_one_step(head):
    net = WiseSrNet(img_size=[64, 96], head=head, out_channels=3, dropout=0.1, backbone_kwargs=TINY_DENSENET)
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    before = [p.detach().clone() for p in net.head.parameters()]
    loss = torch.nn.functional.cross_entropy(net(torch.rand(2, 1, 64, 96)), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, net.head.parameters()))


def test_flatten_head_sees_every_position():
    net = WiseSrNet(img_size=64, head="flatten", out_channels=2, backbone_kwargs=TINY_DENSENET)
    assert net.head.fc.in_features == net.backbone.out_channels * 2 * 2


def test_size_mismatch_names_both_sizes():
    net = WiseSrNet(img_size=64, backbone_kwargs=TINY_DENSENET)
    with pytest.raises(ValueError, match=r"\[96, 96\].*\[64, 64\]"):
        net(torch.rand(1, 1, 96, 96))


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="densenet121"):
        WiseSrNet("resnet50")
    with pytest.raises(ValueError, match="wise_unconstrained"):
        WiseSrNet(head="avg")


def test_gap_head_equals_monai_densenet121():
    torch.manual_seed(0)
    reference = DenseNet121(spatial_dims=2, in_channels=1, out_channels=3).eval()
    path_state = {k: v for k, v in reference.state_dict().items()}
    net = WiseSrNet("densenet121", in_channels=1, out_channels=3, img_size=64, head="gap").eval()
    net.backbone.load_state_dict({k: v for k, v in path_state.items() if k.startswith("features.")})
    net.head.fc.load_state_dict({"weight": path_state["class_layers.out.weight"], "bias": path_state["class_layers.out.bias"]})
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x))


def test_pretrained_weights_from_local_monai_checkpoint(tmp_path):
    reference = DenseNet121(spatial_dims=2, in_channels=3, out_channels=5)
    path = tmp_path / "densenet121_rgb.pt"
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    net = WiseSrNet("densenet121", in_channels=1, img_size=64, pretrained_weights=path)
    stem = reference.features.conv0.weight.sum(1, keepdim=True)
    torch.testing.assert_close(net.backbone.features.conv0.weight, stem)
    torch.testing.assert_close(net.backbone.features.norm5.weight, reference.features.norm5.weight)
    report = load_pretrained_weights(net, path)
    assert any("class_layers.out.weight" in k for k in report["skipped"])  # 5 classes != 2
    assert set(report["missing"]) == {k for k in net.state_dict() if k.startswith("head.")}


def test_pretrained_weights_missing_file():
    with pytest.raises(WsrMedError, match="checkpoint not found: nowhere.pt \\(the pretrained_weights setting names it\\)"):
        WiseSrNet(img_size=64, pretrained_weights="nowhere.pt", backbone_kwargs=TINY_DENSENET)


@pytest.mark.parametrize("backbone", ["densenet121", "efficientnet-b0"])
def test_torchscript_round_trip(tmp_path, backbone):
    kwargs = {"backbone_kwargs": TINY_DENSENET} if backbone.startswith("densenet") else {}
    net = WiseSrNet(backbone, img_size=64, out_channels=3, **kwargs).eval()
    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(net), path)
    loaded = torch.jit.load(path)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    with pytest.raises(Exception, match="differs from the size"):
        loaded(torch.rand(1, 1, 32, 32))


def test_onnx_export_matches(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    net = WiseSrNet(img_size=64, out_channels=2, backbone_kwargs=TINY_DENSENET).eval()
    x = torch.rand(1, 1, 64, 64)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), path, input_names=["image"], output_names=["logits"], dynamo=True)
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(x), atol=1e-4, rtol=1e-4)


def test_constraint_handler_in_monai_trainer():
    from monai.engines import SupervisedTrainer

    from wsr_med.handlers import ConstraintHandler

    net = WiseSrNet(img_size=32, out_channels=2, backbone_kwargs=TINY_DENSENET)
    data = [{"image": torch.rand(2, 1, 32, 32), "label": torch.tensor([0, 1])} for _ in range(3)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=100.0),
        loss_function=lambda logits, y: logits.sum() + 100 * net.head.compression.depthwise.weight.sum(),
        train_handlers=[ConstraintHandler()],
    )
    trainer.run()
    assert trainer.state.iteration == 3
    assert net.head.compression.depthwise.weight.min() >= 0


# ---------------------------------------------------------------- BatchNorm: eval-mode outputs that are not collapsed


def _batchnorm_momenta(net: torch.nn.Module) -> set[float]:
    return {m.momentum for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


def test_bn_momentum_is_pytorchs_for_both_families():
    assert _batchnorm_momenta(WiseSrNet("efficientnet-b0", img_size=64)) == {0.1}
    assert _batchnorm_momenta(WiseSrNet(img_size=64, backbone_kwargs=TINY_DENSENET)) == {0.1}
    assert _batchnorm_momenta(WiseSrNet("efficientnet-b0", img_size=64, bn_momentum=None)) == {0.01}  # MONAI's own


@pytest.fixture(scope="module")
def real_batch(chest_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """16 real chest X-rays at 64 px, 8 per class."""
    from wsr_med.data import scan_transforms

    files = sorted((chest_dir / "NORMAL").glob("*.jpeg"))[:8] + sorted((chest_dir / "PNEUMONIA").glob("*.jpeg"))[:8]
    transform = scan_transforms(64)
    return torch.stack([transform({"image": str(f)})["image"] for f in files]), torch.tensor([0] * 8 + [1] * 8)


@pytest.mark.parametrize("backbone", ["efficientnet-b0", "densenet121"])
def test_a_few_dozen_steps_give_eval_outputs_that_differ(real_batch, backbone):
    from wsr_med.metrics import collapse_warning

    probs, _ = train_briefly(backbone, *real_batch, momentum=0.1, warm_start=True, steps=30)  # the bundle's defaults
    assert collapse_warning(probs.numpy()) is None, probs


def test_collapse_warning_fires_on_a_collapsed_model(real_batch):
    """MONAI's EfficientNet as it comes (momentum 0.01, plain running averages): eval outputs are one point."""
    from wsr_med.metrics import collapse_warning

    probs, _ = train_briefly("efficientnet-b0", *real_batch, momentum=None, warm_start=False, steps=30)
    assert "collapsed" in collapse_warning(probs.numpy())
    assert collapse_warning(torch.full((4, 2), 0.5).numpy()) is not None
    assert collapse_warning(torch.tensor([[0.9, 0.1], [0.2, 0.8]]).numpy()) is None


def test_imagenet_weights_by_name_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """pretrained_weights=imagenet: the file in $TORCH_HOME/hub/checkpoints is found and every backbone tensor
    loads (RGB stem summed for grayscale); an empty cache, downloads off, is a clear error naming file and folder."""
    from wsr_med.errors import WsrMedError
    from wsr_med.networks import imagenet_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "densenet121-a639ec97.pth"
    assert imagenet_weights_file("densenet121") == expected
    with pytest.raises(WsrMedError) as missing:
        WiseSrNet("densenet121", img_size=64, pretrained_weights="imagenet")
    assert "densenet121-a639ec97.pth is not in" in str(missing.value) and str(expected.parent) in str(missing.value)
    reference = DenseNet121(spatial_dims=2, in_channels=3, out_channels=1000)
    expected.parent.mkdir(parents=True)
    # torchvision's names (norm.1, conv.2) and no BatchNorm counters, as in the real file
    torch.save({re.sub(r"layers\.(norm|relu|conv)([12])", r"\1.\2", k).replace("class_layers.out", "classifier"): v
                for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}, expected)
    net = WiseSrNet("densenet121", img_size=64, pretrained_weights="imagenet")
    torch.testing.assert_close(net.backbone.features.conv0.weight, reference.features.conv0.weight.sum(1, keepdim=True))
    for key, value in reference.features.state_dict().items():
        if not key.endswith("num_batches_tracked") and key != "conv0.weight":
            torch.testing.assert_close(net.backbone.features.state_dict()[key], value)
    with pytest.raises(WsrMedError, match="no ImageNet weights for backbone 'densenet264'"):
        WiseSrNet("densenet264", img_size=64, pretrained_weights="imagenet")


def test_a_checkpoint_that_misses_backbone_tensors_is_an_error(tmp_path):
    from wsr_med.errors import WsrMedError

    reference = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    partial = {k: v for k, v in reference.state_dict().items() if "denseblock4" not in k}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(WsrMedError, match="does not fit this backbone"):
        WiseSrNet("densenet121", img_size=64, pretrained_weights=tmp_path / "partial.pt")


def test_backbone_learning_rate_scale_makes_two_parameter_groups():
    from wsr_med.networks import optimizer_param_groups

    net = WiseSrNet(img_size=64, backbone_kwargs=TINY_DENSENET)
    assert len(optimizer_param_groups(net, 0.01)) == len(list(net.parameters()))  # one plain group
    groups = optimizer_param_groups(net, 0.01, {"backbone_lr_scale": 0.1})
    assert [g["lr"] for g in groups] == [pytest.approx(0.001), 0.01]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_freeze_backbone_trains_the_head_alone_for_the_first_epochs():
    from ignite.engine import Engine, Events

    from wsr_med.handlers import FreezeBackbone

    net = WiseSrNet(img_size=64, backbone_kwargs=TINY_DENSENET)
    seen = []
    engine = Engine(lambda e, batch: None)
    FreezeBackbone(net, epochs=2).attach(engine)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(
        (any(p.requires_grad for p in net.backbone.parameters()), all(p.requires_grad for p in net.head.parameters()))))
    engine.run([0], max_epochs=3)
    assert seen == [(False, True), (False, True), (True, True)]


@pytest.mark.parametrize("backbone, kwargs", [("densenet121", {"init_features": 8, "growth_rate": 4, "block_config": [2, 2, 2, 2]}),
                                              ("efficientnet-b0", {})])
@pytest.mark.parametrize("spatial_dims, size", [(2, 64), (3, 32)])
def test_checkpointing_gives_the_same_outputs_gradients_and_batchnorm_statistics(backbone, kwargs, spatial_dims, size):
    torch.manual_seed(0)
    plain = WiseSrNet(backbone, spatial_dims, 1, 3, size, backbone_kwargs=kwargs)
    checkpointed = WiseSrNet(backbone, spatial_dims, 1, 3, size, backbone_kwargs=kwargs, checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, *[size] * spatial_dims)
    results = []
    for net in (plain, checkpointed):
        optimizer = torch.optim.AdamW(net.parameters(), 1e-3)
        warm_start_batchnorm(optimizer, net)
        for step in range(2):  # the second step runs with the statistics and weights the first left
            torch.manual_seed(step)  # EfficientNet's drop-connect: the same draws in both
            logits = net(x)
            optimizer.zero_grad()
            logits.logsumexp(1).sum().backward()
            optimizer.step()
        results.append((logits.detach(), {n: p.grad for n, p in net.named_parameters()}, net.state_dict()))
    (logits_a, grads_a, state_a), (logits_b, grads_b, state_b) = results
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in state_a:  # running means/variances and batch counts: the recomputation must not count twice
        torch.testing.assert_close(state_b[name], state_a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert int(state_b[next(k for k in state_b if k.endswith("num_batches_tracked"))]) == 2


def test_checkpointing_keeps_less_for_backward_and_inference_is_plain():
    from wsr_med.pipelines.bench_heads import saved_activations_mib

    kwargs = {"init_features": 16, "growth_rate": 8, "block_config": [2, 2, 2, 2]}
    x, y = torch.rand(2, 1, 128, 128), torch.tensor([0, 1])
    plain = WiseSrNet("densenet121", 2, 1, 2, 128, backbone_kwargs=kwargs).train()
    checkpointed = WiseSrNet("densenet121", 2, 1, 2, 128, backbone_kwargs=kwargs, checkpointing=True).train()
    assert saved_activations_mib(checkpointed, x, y) < 0.35 * saved_activations_mib(plain, x, y)
    scripted = torch.jit.script(checkpointed.eval())  # the export path: no checkpoint in the scripted graph
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), checkpointed(x))


@pytest.mark.parametrize("head", HEADS)
def test_the_evidence_map_is_the_heads_exact_decomposition_of_the_logit(head):
    """Summed over positions, each class's contribution map equals its logit minus what the head adds with no feature
    at all (its bias terms): every head is positively homogeneous in the feature map, so the map is exact."""
    torch.manual_seed(0)
    net = WiseSrNet("densenet121", spatial_dims=2, in_channels=1, out_channels=3, img_size=64, head=head,
                    backbone_kwargs=TINY_DENSENET).eval()
    torch.nn.init.normal_(net.head.fc.weight)  # far from the near-zero start, so the check is not trivially small
    images = torch.rand(2, 1, 64, 64)
    evidence = HeadEvidence(net, images)
    with torch.no_grad():
        features = net.backbone(images)
        baseline = net.head(torch.zeros_like(features))
        torch.testing.assert_close(evidence.logits, net(images))
    for k in range(3):
        maps = evidence.maps([k, k])
        assert maps.shape == (2, *features.shape[2:])
        torch.testing.assert_close(maps.flatten(1).sum(1), evidence.logits[:, k] - baseline[:, k], atol=1e-5, rtol=1e-4)


def test_the_strongest_point_maps_back_to_the_source_pixels():
    """A 300 x 600 image at 64 px: resized to 32 x 64, padded 16 rows above; a point goes back through both."""
    contribution = torch.zeros(4, 4)
    contribution[1, 0] = 1.0  # the cell of rows 16-32, columns 0-16 of the network's input
    assert strongest_point(contribution, 64) == (24.0, 8.0)
    row, column = to_source_pixels((24.0, 8.0), (300, 600), 64)
    assert (row, column) == pytest.approx((75.0, 75.0))
    assert to_source_pixels((2.0, 70.0), (300, 600), 64) == (0.0, 600.0)  # in the padding or past the edge: clipped
