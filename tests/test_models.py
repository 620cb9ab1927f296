"""Backbone, VAE and classifier on tiny generated data."""

import numpy as np
import pytest
import torch
from PIL import Image

from atlas.backbone import (
    PRESETS,
    VALIDATE_EVERY,
    Backbone,
    BackboneError,
    augment,
    blur,
    channel_statistics,
    dihedral_views,
    fold_batch_norms,
    hue_jitter,
    stain_jitter,
)
from atlas.cell import NUCLEUS
from atlas.classifier import CellClassifier, choose_flag_threshold, classifier_input, entropy_bits
from atlas.crop import canonical_orientation
from atlas.synthetic import synthetic_cell
from atlas.vae import VAE


@pytest.fixture(scope="module")
def tiny_backbone():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 16)
    crops = [synthetic_cell(("lymphocyte", "neutrophil")[y], rng) for y in labels]
    images = np.stack([np.asarray(Image.fromarray(c).resize((48, 48), Image.LANCZOS)) for c in crops])
    return Backbone("tiny", epochs=1, device="cpu").fit(images, labels, ["lymphocyte", "neutrophil"],
                                                        progress=False), images


def test_embedding_is_invariant_to_right_angle_rotations_and_mirroring(tiny_backbone):
    backbone, images = tiny_backbone
    base = backbone.embed(images[:4])
    assert base.shape == (4, backbone.feature_dim)
    for k in (1, 2, 3):
        np.testing.assert_allclose(backbone.embed(np.rot90(images[:4], k, axes=(1, 2))), base, atol=1e-4)
    np.testing.assert_allclose(backbone.embed(images[:4, :, ::-1]), base, atol=1e-4)


def test_dihedral_views_are_eight_distinct_transforms():
    import torch

    x = torch.arange(9.0).view(1, 1, 3, 3)
    views = {tuple(v.flatten().tolist()) for v in dihedral_views(x)}
    assert len(views) == 8


def test_backbone_save_load_gives_the_same_embedding(tiny_backbone, tmp_path):
    backbone, images = tiny_backbone
    backbone.save(tmp_path / "b.pt")
    again = Backbone.load(tmp_path / "b.pt", device="cpu")
    np.testing.assert_allclose(again.embed(images[:3]), backbone.embed(images[:3]), atol=1e-5)


def test_folded_batch_norms_give_the_eager_models_features(tiny_backbone):
    """Embedding runs a copy with each batch norm folded into its convolution: no batch norm
    is left, the model being trained is untouched, and the features are the eager model's."""
    backbone, images = tiny_backbone
    model = backbone.model_
    folded = fold_batch_norms(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = backbone._prepare(images[:5])
    with torch.no_grad():
        eager = model.eval().forward_features(x)
        assert eager.abs().max() > 0
        torch.testing.assert_close(folded.forward_features(x), eager, rtol=1e-4, atol=1e-5)



def test_a_refitted_backbone_embeds_with_its_new_weights(tiny_backbone):
    _, images = tiny_backbone
    labels = np.array([0, 1] * 16)
    backbone = Backbone("tiny", epochs=1, device="cpu", seed=1).fit(images, labels, ["a", "b"], progress=False)
    first = backbone.embed(images[:2])
    backbone.epochs = 2
    backbone.fit(images, labels, ["a", "b"], progress=False)  # a stale folded copy would repeat `first`
    assert not np.allclose(backbone.embed(images[:2]), first, atol=1e-4)


def test_a_small_archive_trains_more_epochs_up_to_twice_the_presets():
    from dataclasses import replace

    preset = replace(PRESETS["tiny"], epochs=10, batch_size=10, min_steps=1000)
    assert preset.epochs_for(1000) == 10  # 100 steps an epoch: the preset's epochs
    assert preset.epochs_for(700) == 15  # 70 steps an epoch: 1,050 steps
    assert preset.epochs_for(500) == 20 and preset.epochs_for(250) == 20  # capped at twice
    assert replace(preset, min_steps=0).epochs_for(5) == 10
    cpu = PRESETS["cpu"]
    assert cpu.epochs_for(6719) == cpu.epochs  # the 80% PBC split's training cells


def test_validation_accuracy_is_measured_every_few_epochs_and_after_the_last(tiny_backbone):
    _, images = tiny_backbone
    labels = np.array([0, 1] * 16)
    epochs = VALIDATE_EVERY + 2
    backbone = Backbone("tiny", epochs=epochs, device="cpu").fit(
        images[:24], labels[:24], ["a", "b"], images[24:], labels[24:], progress=False)
    validated = [r["epoch"] for r in backbone.history_ if "val_accuracy" in r]
    assert validated == [VALIDATE_EVERY, epochs]
    assert 0.0 <= backbone.history_[-1]["val_accuracy"] <= 1.0


def test_channel_statistics_are_numpys_mean_and_std():
    images = np.random.default_rng(3).integers(0, 256, (7, 9, 11, 3), dtype=np.uint8)
    mean, std = channel_statistics(images)
    np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0) / 255, rtol=1e-12)
    np.testing.assert_allclose(std, images.reshape(-1, 3).std(0) / 255 + 1e-6, rtol=1e-12)


def _colour_batch(n=6, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(5)) * 0.8 + 0.1


def test_stain_jitter_without_jitter_is_the_identity_and_with_it_differs_per_image():
    x = _colour_batch()
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(stain_jitter(x, generator, scale=0.0, shift=0.0), x, atol=1e-5, rtol=0)
    same = x[:1].expand(4, -1, -1, -1)
    out = stain_jitter(same, generator)
    assert out.shape == same.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # each image its own stains


def test_stain_jitter_scales_each_stains_optical_density():
    """One pixel, checked the long way round: deconvolve with scikit-image, scale, reconvolve."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    x = torch.tensor([0.55, 0.35, 0.7]).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(7)
    out = stain_jitter(x, generator, scale=0.3, shift=0.1).flatten().double().numpy()
    generator = torch.Generator().manual_seed(7)
    gain = 0.7 + 0.6 * torch.rand((1, 3), generator=generator).double().numpy()
    offset = -0.1 + 0.2 * torch.rand((1, 3), generator=generator).double().numpy()
    stains = -np.log(x.flatten().double().numpy()) @ hed_from_rgb
    expected = np.exp(-((stains * gain + offset) @ rgb_from_hed)).clip(0, 1).ravel()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_hue_jitter_turns_colours_but_leaves_greys_and_brightness():
    generator = torch.Generator().manual_seed(1)
    torch.testing.assert_close(hue_jitter(_colour_batch(), generator, degrees=0.0), _colour_batch(), atol=1e-5, rtol=0)
    grey = torch.full((3, 3, 4, 4), 0.4)
    torch.testing.assert_close(hue_jitter(grey, generator, degrees=90.0), grey, atol=1e-5, rtol=0)
    x = torch.tensor([0.3, 0.5, 0.6]).view(1, 3, 1, 1).expand(8, 3, 1, 1)
    turned = hue_jitter(x, generator, degrees=40.0)
    assert not torch.allclose(turned[0], turned[1], atol=1e-3)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((turned * luma).sum(1), (x * luma).sum(1), atol=1e-5, rtol=0)


def test_blur_keeps_flat_images_and_softens_an_edge():
    generator = torch.Generator().manual_seed(2)
    flat = torch.full((4, 3, 8, 8), 0.6)
    torch.testing.assert_close(blur(flat, generator), flat)
    edge = torch.zeros(16, 3, 8, 8)
    edge[..., 4:] = 1.0
    out = blur(edge, generator)
    assert out.min() >= 0 and out.max() <= 1
    assert (out[..., 3] > 0).any() and (out[..., 3] < 1 / 3 + 1e-6).all()  # at most a third spills over


@pytest.mark.parametrize("stain", [False, True])
def test_augment_keeps_shape_and_is_reproducible(stain):
    x = _colour_batch(8, 24)
    first = augment(x, torch.Generator().manual_seed(4), stain=stain)
    assert first.shape == x.shape and torch.isfinite(first).all()
    torch.testing.assert_close(augment(x, torch.Generator().manual_seed(4), stain=stain), first)
    assert not torch.allclose(augment(x, torch.Generator().manual_seed(5), stain=stain), first)
    assert not torch.allclose(augment(x, torch.Generator().manual_seed(4), stain=not stain), first)


def test_a_backbone_trained_with_stain_jitter_says_so_after_loading(tiny_backbone, tmp_path):
    _, images = tiny_backbone
    labels = np.array([0, 1] * 16)
    backbone = Backbone("tiny", epochs=1, device="cpu", stain_jitter=True).fit(images, labels, ["a", "b"], progress=False)
    backbone.save(tmp_path / "b.pt")
    assert Backbone.load(tmp_path / "b.pt", device="cpu").stain_jitter is True


def test_pretrained_without_public_weights_is_a_clear_error():
    with pytest.raises(BackboneError, match="no public weights"):
        Backbone("tiny", pretrained=True, device="cpu").fit(
            np.zeros((2, 48, 48, 3), np.uint8), np.array([0, 1]), ["a", "b"], progress=False)


def test_vae_latent_shape_determinism_and_round_trip(tmp_path):
    features = np.random.default_rng(0).normal(size=(64, 30)).astype(np.float32)
    a = VAE(latent_dim=5, epochs=3, batch_size=16, seed=1).fit(features, progress=False)
    b = VAE(latent_dim=5, epochs=3, batch_size=16, seed=1).fit(features, progress=False)
    np.testing.assert_allclose(a.transform(features), b.transform(features), atol=1e-6)
    assert a.transform(features).shape == (64, 5)
    a.save(tmp_path / "v.pt")
    np.testing.assert_allclose(VAE.load(tmp_path / "v.pt").transform(features), a.transform(features), atol=1e-6)


def test_entropy_bits_known_values():
    assert entropy_bits(np.full(8, 1 / 8)) == pytest.approx(3.0)
    assert entropy_bits(np.array([1.0, 0, 0])) == pytest.approx(0.0, abs=1e-9)
    assert entropy_bits(np.array([0.5, 0.5])) == pytest.approx(1.0)


def test_classifier_learns_separable_classes_and_out_of_fold_is_honest():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    x = rng.normal(size=(90, 4)) + y[:, None] * 4
    classifier = CellClassifier(n_estimators=30, threads=1).fit(x, y, ["a", "b", "c"])
    assert (classifier.predict_proba(x).argmax(1) == y).mean() == 1.0
    oof = classifier.out_of_fold_proba_
    assert oof.shape == (90, 3) and (oof.argmax(1) == y).mean() > 0.9
    noise = rng.normal(size=(90, 4))
    on_noise = CellClassifier(n_estimators=30, threads=1).fit(noise, y, ["a", "b", "c"])
    assert (on_noise.out_of_fold_proba_.argmax(1) == y).mean() < 0.6


def test_classifier_predict_gives_label_entropy_and_its_own_flag(tmp_path):
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 30)
    x = rng.normal(size=(90, 4)) + y[:, None] * 4
    classifier = CellClassifier(n_estimators=30, flag_entropy=0.5, threads=1).fit(x, y, ["a", "b", "c"])
    assert classifier.flag_bits_ == 0.5
    clear, between = x[[0, 45, 89]], np.array([[2.0, 2.0, 2.0, 2.0]])  # class centres; halfway a-b
    predictions = classifier.predict(np.vstack([clear, between]))
    assert list(predictions.labels[:3]) == ["a", "b", "c"]
    np.testing.assert_allclose(predictions.entropy_bits, entropy_bits(predictions.probabilities))
    # calibrated: flagged when the prediction set is not one class (the entropy threshold
    # flags only classifiers saved before calibration, tests/test_conformal.py)
    np.testing.assert_array_equal(predictions.flagged, predictions.sets.sum(1) != 1)
    assert predictions.entropy_bits[3] > predictions.entropy_bits[:3].max()
    one = predictions[3]
    assert one.label == predictions.labels[3] and set(one.probabilities) == {"a", "b", "c"}
    classifier.save(tmp_path / "c.json")  # the threshold travels with the trees
    again = CellClassifier.load(tmp_path / "c.json")
    assert again.flag_bits_ == 0.5 and again.classes_ == ["a", "b", "c"]
    np.testing.assert_allclose(again.predict(between).probabilities, predictions.probabilities[3:], rtol=1e-6)


def test_classifier_auto_threshold_comes_from_its_out_of_fold_predictions():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 40)
    x = rng.normal(size=(80, 3)) + y[:, None] * 1.5  # overlapping: some cells are hard
    classifier = CellClassifier(n_estimators=20, flag_entropy="auto", threads=1).fit(x, y, ["a", "b"])
    expected = choose_flag_threshold(classifier.out_of_fold_proba_, y)["chosen_bits"]
    assert classifier.flag_bits_ == expected


def test_classifier_saved_before_it_kept_its_threshold_loads_with_the_manifests(tmp_path):
    import json

    y = np.repeat([0, 1], 10)
    x = np.random.default_rng(3).normal(size=(20, 2)) + y[:, None] * 5
    CellClassifier(n_estimators=5, threads=1).fit(x, y, ["a", "b"]).save(tmp_path / "c.json")
    (tmp_path / "c.json.classes.json").write_text(json.dumps(["a", "b"]))  # the old sidecar
    with pytest.raises(ValueError, match="flag_bits"):
        CellClassifier.load(tmp_path / "c.json")
    assert CellClassifier.load(tmp_path / "c.json", flag_bits=0.9).flag_bits_ == 0.9


def test_classifier_input_is_features_beside_latents():
    joined = classifier_input(np.ones((2, 3)), np.zeros((2, 4)))
    assert joined.shape == (2, 7) and joined.dtype == np.float32
    np.testing.assert_array_equal(joined[:, :3], 1)


def test_flag_threshold_separates_wrong_from_right():
    confident = np.tile([0.97, 0.01, 0.01, 0.01], (20, 1))
    unsure = np.tile([0.3, 0.25, 0.25, 0.2], (5, 1))
    proba = np.vstack([confident, unsure])
    labels = np.array([0] * 20 + [1] * 5)  # every unsure prediction is wrong
    choice = choose_flag_threshold(proba, labels)
    assert entropy_bits(confident[0]) < choice["chosen_bits"] < entropy_bits(unsure[0])


def test_canonical_orientation_turns_the_nucleus_long_axis_horizontal():
    from skimage.draw import ellipse

    image = np.full((128, 128, 3), 230, np.uint8)
    mask = np.zeros((128, 128), np.uint8)
    rr, cc = ellipse(64, 64, 12, 40, (128, 128), rotation=np.radians(35))  # long axis at 35 deg
    mask[rr, cc] = NUCLEUS
    image[rr, cc] = (90, 50, 130)
    turned = canonical_orientation(image, mask)
    dark = turned[..., 1] < 120
    rows, cols = np.nonzero(dark)
    assert np.ptp(cols) > 2.5 * np.ptp(rows)  # now wide, not tall or diagonal


def test_vae_whitens_its_inputs_so_low_variance_detail_is_kept(tmp_path):
    """Three strong factors and one weak one (two groups) mixed over 20 dimensions: without
    whitening the VAE spends its latent on the strong factors and the groups are lost; with the
    top 4 principal components whitened they weigh the same and the latent keeps the groups."""
    rng = np.random.default_rng(0)
    n = 200
    mix = np.linalg.qr(rng.normal(size=(20, 20)))[0]
    group = np.repeat([0, 1], n // 2)
    signal = np.hstack([rng.normal(size=(n, 3)) * [10, 8, 6], (group[:, None] - 0.5)]) @ mix[:4]
    features = (signal + rng.normal(scale=0.05, size=(n, 20))).astype(np.float32)
    vae = VAE(latent_dim=4, epochs=30, batch_size=32, whiten_dim=4, seed=0).fit(features, progress=False)
    assert vae.projection_.shape == (20, 4)
    np.testing.assert_allclose(vae._inputs(features).std(0), 1.0, atol=0.05)
    vae.save(tmp_path / "v.pt")
    np.testing.assert_allclose(VAE.load(tmp_path / "v.pt").transform(features), vae.transform(features), atol=1e-5)
    off = VAE(latent_dim=4, epochs=30, batch_size=32, whiten_dim=0, seed=0).fit(features, progress=False)
    assert off.projection_ is None
    assert _nearest_agreement(vae.transform(features), group) > 0.95
    assert _nearest_agreement(off.transform(features), group) < 0.75


def _nearest_agreement(points: np.ndarray, group: np.ndarray) -> float:
    distances = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    return float((group[distances.argmin(1)] == group).mean())


def test_vae_saved_before_whitening_still_loads(tmp_path):
    features = np.random.default_rng(0).normal(size=(64, 30)).astype(np.float32)
    vae = VAE(latent_dim=5, epochs=2, batch_size=16, whiten_dim=0).fit(features, progress=False)
    vae.save(tmp_path / "v.pt")
    state = torch.load(tmp_path / "v.pt", weights_only=False)
    del state["params"]["whiten_dim"], state["projection"]  # the format of the first atlases
    torch.save(state, tmp_path / "old.pt")
    np.testing.assert_allclose(VAE.load(tmp_path / "old.pt").transform(features), vae.transform(features), atol=1e-6)
