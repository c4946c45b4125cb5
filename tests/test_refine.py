import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from text4seg_demo.evaluation.metrics import iou
from text4seg_demo.masks import to_grid, to_image
from text4seg_demo.refine import (
    LOGIT,
    GrabCutRefiner,
    RefinerError,
    SamRefiner,
    build_refiner,
    letterbox_logits,
    sample_points,
)

IMG = 64  # the tiny SAM's input side; its mask prompt is IMG / 4 = 16


def tiny_sam(seed=0):
    torch.manual_seed(seed)
    encoder = ImageEncoderViT(img_size=IMG, patch_size=16, embed_dim=32, depth=1, num_heads=1, out_chans=32,
                              global_attn_indexes=(0,), window_size=0)
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(IMG // 16, IMG // 16), input_image_size=(IMG, IMG),
                           mask_in_chans=4)
    decoder = MaskDecoder(transformer_dim=32, num_multimask_outputs=3, iou_head_depth=1, iou_head_hidden_dim=16,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=32, num_heads=1))
    return Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder)


def disk_image(w=120, h=90, box=(30, 20, 80, 70)):
    image = Image.new("RGB", (w, h), (90, 110, 100))
    ImageDraw.Draw(image).ellipse(box, fill=(220, 40, 40))
    truth = np.zeros((h, w), bool)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    truth[np.asarray(mask) > 0] = True
    return image, truth


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (30, 64), (64, 64), (17, 50)])
def test_mask_prompt_is_letterboxed_like_sams_own_input(shape):
    h, w = shape
    sam = tiny_sam()
    refiner = SamRefiner(sam, "sam", "tiny")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    refiner._set_image(image)
    ih, iw = refiner.predictor.input_size  # SAM's resized (unpadded) input
    assert (ih, iw) == ResizeLongestSide.get_preprocess_shape(h, w, IMG)
    mask = np.zeros((h, w), bool)
    mask[: h // 2] = True
    prompt = letterbox_logits(mask, IMG // 4)
    assert prompt.shape == (1, IMG // 4, IMG // 4)
    vh, vw = ResizeLongestSide.get_preprocess_shape(h, w, IMG // 4)
    assert (vh * 4, vw * 4) == pytest.approx((ih, iw), abs=4)  # same frame, a quarter of the resolution
    assert (prompt[0, vh:] == 0).all() and (prompt[0, :, vw:] == 0).all()  # padded bottom/right
    assert prompt[0, 0, 0] == pytest.approx(LOGIT, abs=1e-4) and prompt[0, vh - 1, 0] == pytest.approx(-LOGIT, abs=1e-4)


def test_sam_procedure_prompts_points_and_feeds_logits_back(monkeypatch):
    refiner = SamRefiner(tiny_sam(), "sam", "tiny")
    calls = []
    original = refiner.predictor.predict

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(refiner.predictor, "predict", spy)
    image, truth = disk_image()
    coarse = to_image(to_grid(truth.astype(np.uint8), 16), *truth.shape).astype(np.int32)
    out = refiner.refine(image, coarse, ["others", "disk"], points=7, seed=3)
    assert len(calls) == 3
    first, second, third = calls
    assert first["point_coords"].shape == (14, 2) and list(first["point_labels"]) == [1] * 7 + [0] * 7
    assert first["mask_input"].shape == (1, IMG // 4, IMG // 4)
    assert second["mask_input"].shape == (1, IMG // 4, IMG // 4) and not np.allclose(second["mask_input"], first["mask_input"])
    assert all(c["multimask_output"] is False for c in calls)
    xs, ys = first["point_coords"][:7].T.astype(int)
    assert coarse[ys, xs].all()  # foreground points lie in the coarse mask
    assert out.mask.shape == truth.shape
    assert out.info["refiner"] == "sam" and out.info["decoder_s"] > 0


def test_sam_is_deterministic_for_a_seed_and_skips_empty_masks():
    image, truth = disk_image()
    coarse = to_image(to_grid(truth.astype(np.uint8), 16), *truth.shape).astype(np.int32)
    a = SamRefiner(tiny_sam(), "sam", "tiny").refine(image, coarse, ["others", "disk"], seed=5)
    b = SamRefiner(tiny_sam(), "sam", "tiny").refine(image, coarse, ["others", "disk"], seed=5)
    assert (a.mask == b.mask).all()
    p1 = sample_points(coarse > 0, 10, np.random.default_rng(5))[0]
    p2 = sample_points(coarse > 0, 10, np.random.default_rng(6))[0]
    assert not np.array_equal(p1, p2)
    empty = SamRefiner(tiny_sam(), "sam", "tiny")
    out = empty.refine(image, np.zeros_like(coarse), ["others", "disk"])
    assert not out.mask.any() and empty.encoder_calls == 0


def test_embedding_cache_skips_the_encoder_on_a_repeat_image():
    sam = tiny_sam()
    calls = {"n": 0}
    forward = sam.image_encoder.forward

    def counted(x):
        calls["n"] += 1
        return forward(x)

    sam.image_encoder.forward = counted
    refiner = SamRefiner(sam, "sam", "tiny")
    image, truth = disk_image()
    coarse = to_image(to_grid(truth.astype(np.uint8), 16), *truth.shape).astype(np.int32)
    first = refiner.refine(image, coarse, ["others", "disk"])
    second = refiner.refine(image.copy(), coarse, ["others", "disk"], seed=1)
    assert calls["n"] == 1 and second.info["cached_embedding"] and not first.info["cached_embedding"]
    other, _ = disk_image(box=(10, 10, 50, 60))
    refiner.refine(other, coarse, ["others", "disk"])
    assert calls["n"] == 2


def test_grabcut_recovers_a_disk_from_its_blocky_grid():
    image, truth = disk_image(w=320, h=240, box=(60, 40, 230, 200))
    coarse = to_image(to_grid(truth.astype(np.uint8), 16), *truth.shape).astype(np.int32)
    assert iou(coarse > 0, truth) < 0.9
    refined = GrabCutRefiner().refine(image, coarse, ["others", "disk"], grid=16)
    assert iou(refined.mask > 0, truth) >= 0.9
    again = GrabCutRefiner().refine(image, coarse, ["others", "disk"], grid=16)
    assert (again.mask == refined.mask).all()


def test_grabcut_keeps_a_small_shapes_edge_on_a_large_image():
    # a 52 x 40 px disk on a 1200 x 900 image: cut at 640 px its edge lands a pixel off (IoU 0.91)
    image, truth = disk_image(w=1200, h=900, box=(300, 300, 352, 340))
    coarse = to_image(to_grid(truth.astype(np.uint8), 16), *truth.shape).astype(np.int32)
    refined = GrabCutRefiner().refine(image, coarse, ["others", "disk"], grid=16)
    assert iou(refined.mask > 0, truth) >= 0.98


def test_grabcut_refines_each_region_against_its_own_surroundings():
    # a red target on blue ground beside a blue target on grey: each region's window holds its own
    # ground, and both targets come out whole without the blue ground around the red one
    pixels = np.full((240, 320, 3), (120, 120, 120), np.uint8)
    pixels[:, :160] = (40, 60, 220)
    image = Image.fromarray(pixels)
    draw, labels = ImageDraw.Draw(image), Image.new("L", (320, 240), 0)
    for box, colour in (((40, 70, 110, 140), (220, 40, 40)), ((200, 80, 280, 160), (40, 60, 220))):
        draw.ellipse(box, fill=colour)
        ImageDraw.Draw(labels).ellipse(box, fill=255)
    truth = np.asarray(labels) > 0
    coarse = to_image(to_grid(truth.astype(np.uint8), 16), *truth.shape).astype(np.int32)
    refined = GrabCutRefiner().refine(image, coarse, ["others", "both"], grid=16)
    assert iou(refined.mask > 0, truth) >= 0.95


def test_grabcut_keeps_an_answer_too_small_to_model():
    # two pixels of a 16-pixel image: GrabCut alone would leave nothing of the answer
    image, _ = disk_image(w=16, h=16, box=(4, 4, 8, 8))
    coarse = np.zeros((16, 16), np.int32)
    coarse[5:7, 5:7] = 1
    refined = GrabCutRefiner().refine(image, coarse, ["others", "disk"], grid=16)
    assert (refined.mask == coarse).all()


def test_missing_sam_checkpoint_offline_says_what_to_do():
    with pytest.raises(RefinerError) as err:
        build_refiner("sam")
    message = str(err.value)
    assert "sam_vit_h_4b8939.pth" in message and "--sam-checkpoint" in message and "grabcut" in message
    with pytest.raises(RefinerError, match="unknown refiner"):
        build_refiner("magic")


def test_box_prompting_asks_once_per_connected_region(monkeypatch):
    refiner = SamRefiner(tiny_sam(), "sam-lite", "tiny", prompt="boxes")
    boxes = []
    original = refiner.predictor.predict

    def spy(**kwargs):
        boxes.append(kwargs["box"].tolist())
        assert "point_coords" not in kwargs and "mask_input" not in kwargs
        return original(**kwargs)

    monkeypatch.setattr(refiner.predictor, "predict", spy)
    coarse = np.zeros((90, 120), np.int32)
    coarse[10:30, 5:25] = 1
    coarse[50:80, 60:110] = 1
    out = refiner.refine(Image.new("RGB", (120, 90), (30, 60, 90)), coarse, ["others", "two boxes"])
    assert sorted(boxes) == [[5, 10, 25, 30], [60, 50, 110, 80]]
    assert out.info["prompt"] == "boxes" and out.mask.shape == coarse.shape
