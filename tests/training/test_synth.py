"""The synthetic domain: determinism, coverage, backgrounds, the shifted split, query pairs."""

import colorsys
import dataclasses
import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from text4seg_demo.training import synth


def digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic_and_covers_the_domain(tmp_path):
    synth.make_dataset(tmp_path / "a", 28, seed=9)
    synth.make_dataset(tmp_path / "b", 28, seed=9)
    synth.make_dataset(tmp_path / "c", 28, seed=10)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    rows = [json.loads(line) for line in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in rows} == set(synth.KINDS)
    assert {r["expression"] for r in rows} <= set(synth.expressions())
    for r in rows:
        image = Image.open(tmp_path / "a" / r["image"])
        mask = np.asarray(Image.open(tmp_path / "a" / r["mask"])) > 0
        assert 128 <= min(image.size) <= 640 and 0.5 <= image.width / image.height <= 2.0
        assert mask.shape == (image.height, image.width)
        assert mask.any() == (r["kind"] != "absent")


def test_a_set_of_one_query_kind_holds_that_kind_where_its_scenes_have_one(tmp_path):
    synth.make_dataset(tmp_path / "side", 24, seed=9, queries_per_image=1, kinds=("side",),
                       domain=synth.SHIFTED)
    rows = [json.loads(line) for line in (tmp_path / "side" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and sum(r["kind"] == "side" for r in rows) >= 20
    for r in rows:
        words = r["expression"].split()
        assert r["kind"] != "side" or " ".join(words[2:]) in synth.SIDES


@pytest.mark.parametrize("style", [b for b in synth.BACKGROUNDS if b != "noisy"])
def test_every_background_family_keeps_clear_of_the_shape_colours(style):
    domain = dataclasses.replace(synth.DOMAIN, backgrounds=(style,), noise=0.0)
    rng = np.random.default_rng(4)
    saturations = []
    for _ in range(12):
        shades = [synth.shade(rng, colour) for colour in rng.choice(list(synth.COLOURS), 3)]
        pixels = synth._background(rng, 96, 64, domain, shades).reshape(-1, 3)
        lab = synth._lab(pixels[::7].astype(np.float32))
        avoid = np.concatenate([synth.SHAPE_LAB, synth._lab(np.array(shades))])
        # mixes are checked at nine points along the way: allow for what lies between them and rounding
        assert np.linalg.norm(lab[:, None] - avoid[None], axis=-1).min() >= synth.MIN_DELTA_E - 3
        saturations.append(float((pixels.max(1) - pixels.min(1)).mean() / max(pixels.max(1).mean(), 1)))
    assert max(saturations) > 0.5  # saturated backgrounds are part of the domain


def test_shapes_are_drawn_in_many_shades_each_nearest_its_own_colour():
    rng = np.random.default_rng(5)
    for colour in synth.COLOURS:
        shades = np.array([synth.shade(rng, colour) for _ in range(60)])
        nearest = np.linalg.norm(synth._lab(shades)[:, None] - synth.SHAPE_LAB[None], axis=-1).argmin(1)
        assert (nearest == list(synth.COLOURS).index(colour)).all()
        hues = [colorsys.rgb_to_hsv(*(c / 255))[0] * 360 for c in shades]
        spread = np.ptp(np.unwrap(np.radians(hues))) * 180 / np.pi
        assert len({tuple(c) for c in shades}) > 50 and spread > 10  # not one RGB triple

    plain = dataclasses.replace(synth.DOMAIN, noise=0.0, blur=0.0, jpeg=0.0)
    image, visible, shapes = synth.SceneMaker(6, plain).scene("all_colour")
    pixels = np.asarray(image)
    for i, s in enumerate(shapes, start=1):
        if (visible == i).sum() > 20:  # the top shape's pixels carry its shade
            assert (pixels[visible == i] == s.rgb).all(1).mean() > 0.9


def test_the_shifted_split_draws_smaller_shapes_in_busier_scenes():
    def stats(domain):
        maker = synth.SceneMaker(11, domain)
        scenes = [maker.scene(synth.KINDS[i % 7]) for i in range(84)]
        sizes = [s.size / min(image.size) for image, _, shapes in scenes for s in shapes]
        return np.mean([len(shapes) for *_, shapes in scenes]), np.median(sizes)

    (count, size), (shifted_count, shifted_size) = stats(synth.DOMAIN), stats(synth.SHIFTED)
    assert shifted_count > count + 0.5 and shifted_size < 0.8 * size
    assert set(synth.SHIFTED.backgrounds) <= set(synth.BACKGROUNDS) and synth.SHIFTED.saturation[0] > 0.5


def test_the_domain_overlaps_shapes_and_lets_them_reach_past_the_edge():
    def stats(domain):
        maker = synth.SceneMaker(12, domain)
        hidden, cut = [], 0
        for i in range(84):
            image, visible, shapes = maker.scene(synth.KINDS[i % 7])
            w, h = image.size
            for k, s in enumerate(shapes, start=1):
                drawn = Image.new("L", (3 * w, 3 * h))  # the image in the middle, room for what lies beyond
                ImageDraw.Draw(drawn).polygon([(x + w, y + h) for x, y in s.polygon()], fill=1)
                whole, inside = np.asarray(drawn), np.asarray(drawn)[h:2 * h, w:2 * w]
                hidden.append(1 - (visible == k).sum() / max(inside.sum(), 1))  # under later shapes
                cut += inside.sum() < 0.9 * whole.sum()
        return np.mean(hidden), cut

    (hidden, cut), (old_hidden, old_cut) = stats(synth.DOMAIN), stats(synth.SHIFTED)
    assert hidden > 1.5 * old_hidden and cut >= 8 and old_cut == 0
    assert min(synth.DOMAIN.spacing) < 0.5 and synth.SHIFTED.spacing == (0.85, 0.85)


def test_contrasting_pairs_share_the_image_and_differ_in_words_and_target():
    for focus in ("size", "side"):
        pair = synth.samples(synth.SceneMaker(3), focus, contrast=True)
        assert pair[0][1] == synth.sample(synth.SceneMaker(3), focus)[1]  # pairing adds a query, changes none
        (image_a, words_a, mask_a), (image_b, words_b, mask_b) = pair
        kind_words = {"size": {"small", "large"}, "side": {"left", "right", "top", "bottom"}}[focus]
        assert image_a is image_b and words_a != words_b
        assert kind_words & set(words_a.split()) and kind_words & set(words_b.split())  # a rival of the same kind
        assert mask_a.any() and mask_b.any() and not (mask_a & mask_b).any()
    (_, absent, nothing), (_, present, shape) = synth.samples(synth.SceneMaker(3), "absent", contrast=True)
    assert not nothing.any() and shape.any() and len(absent.split()) == len(present.split()) == 3  # the COLOUR SHAPE


def test_colour_rivals_make_the_colour_word_decide():
    def decided(colour_rivals: bool) -> float:
        share = []
        for seed in range(60):
            focus = ("colour_shape", "absent")[seed % 2]
            shapes = synth.SceneMaker(seed).scene(focus, colour_rivals=colour_rivals)[2]
            (_, query, mask), *partner = synth.samples(synth.SceneMaker(seed), focus, contrast=True,
                                                       colour_rivals=colour_rivals)
            assert mask.any() == (focus == "colour_shape")
            *_, colour, kind = query.split()
            # the scene shows the kind in another colour and shows the colour (the kind alone cannot
            # answer), and the partner shares one word with the query, so that the other decides
            share.append(any(s.kind == kind and s.colour != colour for s in shapes)
                         and any(s.colour == colour for s in shapes)
                         and bool(partner) and bool({colour, kind} & set(partner[0][1].split())))
        return float(np.mean(share))

    # with rivals, the rest are scenes where overlaps and extra shapes left no such query; without,
    # a random scene has one by chance about one time in six
    assert decided(colour_rivals=True) >= 0.9 and decided(colour_rivals=False) <= 0.25
