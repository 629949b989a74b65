"""Buckets: the list and the per-image choice match sd-scripts (make_bucket_resolutions / BucketManager.select_bucket).

Every expected value below was worked out by hand from sd-scripts' algorithm (kohya-reference §5): list =
square of the resolution's area + for each width the tallest step-multiple height keeping the area, sorted;
choice = exact size if it is a bucket, else the first minimum of |bucket aspect − image aspect|, then scale to
cover with int(x + 0.5); no-upscale = shrink to the area if larger, floor to the step.
"""

from __future__ import annotations

import pytest

from lora_trainer.dataset.buckets import (
    BucketSettings,
    adjusted_bucket_range,
    bucket_list,
    centre_crop_box,
    crop_ltrb,
    fixed_resolution_problem,
    make_bucket_resolutions,
    select_bucket,
)
from lora_trainer.errors import UserError

FIXTURE = dict(resolution=(128, 128), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=256, bucket_reso_steps=64)
SD15 = dict(resolution=(512, 512), enable_bucket=True)  # sd-scripts' default min 256 / max 1024 / step 64
SDXL = dict(resolution=(1024, 1024), enable_bucket=True, min_bucket_reso=256, max_bucket_reso=2048)
NO_UPSCALE = dict(resolution=(512, 512), enable_bucket=True, bucket_no_upscale=True)

# (settings, image size, expected bucket, expected size before the centre crop)
CASES = [
    # fixture list (128 base, 64..256): (64,192) (64,256) (128,128) (192,64) (256,64); exact size is kept as is
    (FIXTURE, (128, 128), (128, 128), (128, 128)),
    # verified in sd-scripts' run: aspect 2/3 is 1/3 from both 64x192 and 128x128, but 1 - 0.666…6 rounds to
    # 0.333…37 > 0.333…33, so the float error sends the tall image to the narrow bucket, no scaling needed
    (FIXTURE, (128, 192), (64, 192), (128, 192)),
    # verified in sd-scripts' run: the wide twin goes to the square (error 0.5 beats 1.1667 and 1.5)
    (FIXTURE, (192, 128), (128, 128), (192, 128)),
    # exact tie: aspect 2 is 1.0 from 128x128 (ratio 1) and from 192x64 (ratio 3); argmin keeps the first in
    # sorted order, the square; image is wider than the bucket so height decides the scale (1.0)
    (FIXTURE, (256, 128), (128, 128), (256, 128)),
    # the transposed image does NOT go to the transposed bucket: 0.5 is nearest 64x192 (1/3), not 64x256 (1/4);
    # the image (0.5) is wider than the bucket (1/3), so height decides: scale 192/256 = 0.75 → 96x192
    (FIXTURE, (128, 256), (64, 192), (96, 192)),
    # small image with an exact bucket aspect (1/4) is upscaled x2 to the bucket: width decides when aspects tie
    (FIXTURE, (32, 128), (64, 256), (64, 256)),
    # SD1.5 defaults: 16:9 → 640x384 (5:3, error 0.111 vs 2.2's 0.422); height decides, 1920*384/1080 = 682.67 → 683
    (SD15, (1920, 1080), (640, 384), (683, 384)),
    # 9:16 → 384x640 (0.6 vs 0.5625); image narrower than bucket, width decides: 1920*384/1080 → 683
    (SD15, (1080, 1920), (384, 640), (384, 683)),
    # square photo shrinks to the square bucket
    (SD15, (1000, 1000), (512, 512), (512, 512)),
    # 3:1 → 832x256 (3.25, error 0.25) beats 768x320 (2.4); narrower than bucket, width decides: 1000*0.2773 → 277
    (SD15, (3000, 1000), (832, 256), (832, 277)),
    # 5:1 is beyond the widest bucket (1024x256 = 4:1); height decides so the width overshoots to 1280 and is cropped
    (SD15, (5000, 1000), (1024, 256), (1280, 256)),
    # SDXL list with max 2048: 2048x256 is itself a bucket (the list goes past the resolution up to max_bucket_reso)
    (SDXL, (2048, 256), (2048, 256), (2048, 256)),
    # 3:2 → 1216x832 (1.4615); wider than the bucket, height decides: 832/800 = 1.04 → upscaled to 1248x832
    (SDXL, (1200, 800), (1216, 832), (1248, 832)),
    # min 200 / max 1000 are snapped to 192 / 1024, which adds a 192x1024 bucket: aspect 0.2 lands there, not in 256x1024
    (dict(SD15, min_bucket_reso=200, max_bucket_reso=1000), (200, 1000), (192, 1024), (205, 1024)),
    # the same image with the default min 256 goes to 256x1024, scaled by width 1.28 → 256x1280
    (SD15, (200, 1000), (256, 1024), (256, 1280)),
    # buckets off: the one bucket is the resolution; a wider image is scaled by height (here 1.0) and centre-cropped
    (dict(resolution=(512, 512)), (768, 512), (512, 512), (768, 512)),
    # buckets off, "512,768" = width 512, height 768: a square image is scaled so its height covers 768
    (dict(resolution=(512, 768)), (1024, 1024), (512, 768), (768, 768)),
    # no-upscale, smaller than the area: keep the size, floor to the step (300→256, 200→192): never enlarged
    (NO_UPSCALE, (300, 200), (256, 192), (300, 200)),
    # no-upscale, larger: shrink to the area keeping the aspect; width and height rounding tie → height branch
    (NO_UPSCALE, (1024, 1024), (512, 512), (512, 512)),
    # no-upscale 16:9: width rounding gives 640x320 (2.0, error 0.22), height rounding 640x384 (1.667, error
    # 0.11): the height branch wins, resize to 683x384, bucket floors 683 to 640
    (NO_UPSCALE, (1920, 1080), (640, 384), (683, 384)),
    # no-upscale 9:16 is not the transpose of the above branch: width rounding (384x640, error 0.0375) wins
    (NO_UPSCALE, (1080, 1920), (384, 640), (384, 683)),
    # no-upscale with an area exactly the resolution's (768·432 = 576²): not "larger", so kept as is and floored to
    # 768x384; treated as larger it would be re-rounded by the height branch to 683x384 in a 640x384 bucket
    (dict(NO_UPSCALE, resolution=(576, 576)), (768, 432), (768, 384), (768, 432)),
    # no-upscale ignores min/max and uses the step only: 1000x700 at step 32 → 992x672 (SDXL allows step 32)
    (dict(resolution=(1024, 1024), enable_bucket=True, bucket_no_upscale=True, bucket_reso_steps=32), (1000, 700), (992, 672), (1000, 700)),
]


@pytest.mark.parametrize("settings, image_size, bucket, resized", CASES)
def test_bucket_matches_sd_scripts(settings, image_size, bucket, resized):
    choice = select_bucket(image_size, BucketSettings(**settings))
    assert (choice.bucket, choice.resized_size) == (bucket, resized)
    # the resized image always covers the bucket, so the centre crop never pads
    assert choice.resized_size[0] >= bucket[0] and choice.resized_size[1] >= bucket[1]


def test_aspect_error_is_bucket_minus_image_as_in_bucket_info():
    choice = select_bucket((300, 200), BucketSettings(**NO_UPSCALE))
    assert choice.aspect_error == pytest.approx(256 / 192 - 1.5)


def test_default_sd15_list_is_the_17_buckets_users_see_in_sd_scripts_logs():
    wide = [(512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]
    expected = sorted(set(wide) | {(h, w) for w, h in wide})
    assert list(bucket_list(BucketSettings(**SD15))) == expected


@pytest.mark.parametrize(
    "resolution, min_size, max_size, count",
    [((1024, 1024), 256, 2048, 41), ((1024, 1024), 256, 1024, 25), ((128, 128), 64, 256, 5)],
)
def test_bucket_counts_match_the_reference(resolution, min_size, max_size, count):
    assert len(make_bucket_resolutions(resolution, min_size, max_size, 64)) == count


def test_min_and_max_are_snapped_outward_to_the_step():
    assert adjusted_bucket_range((512, 512), 200, 1000, 64) == (192, 1024)


def test_min_bucket_larger_than_resolution_names_the_option_and_the_fix():
    with pytest.raises(UserError, match=r"min_bucket_reso 640 .* lower min_bucket_reso to 512"):
        select_bucket((512, 512), BucketSettings((512, 512), enable_bucket=True, min_bucket_reso=640))


def test_max_bucket_smaller_than_resolution_names_the_option_and_the_fix():
    with pytest.raises(UserError, match=r"max_bucket_reso 768 .* raise max_bucket_reso to 1024"):
        bucket_list(BucketSettings((1024, 1024), enable_bucket=True, max_bucket_reso=768))


def test_no_upscale_image_thinner_than_one_step_is_refused_instead_of_a_zero_bucket():
    # sd-scripts would make a 0x0 bucket and fail later with a shape error
    with pytest.raises(UserError, match="40x40"):
        select_bucket((40, 40), BucketSettings(**NO_UPSCALE))


def test_crop_conditioning_is_stabilitys_formula_as_stored_in_the_npz():
    # kohya-fixtures/latent-cache-examples/img_020_0128x0192_sd.npz holds crop_ltrb (0, 48, 64, 144)
    assert crop_ltrb((64, 192), (128, 192)) == (0, 48, 64, 144)


def test_centre_crop_puts_the_odd_pixel_on_the_right():
    assert centre_crop_box((683, 384), (640, 384)) == (21, 0, 661, 384)


def test_fixed_resolution_explains_why_an_image_would_fail_without_buckets():
    assert fixed_resolution_problem((512, 512), (512, 512), random_crop=False) is None
    assert "smaller" in fixed_resolution_problem((400, 600), (512, 512), random_crop=True)
    assert "random_crop" in fixed_resolution_problem((768, 512), (512, 512), random_crop=False)
    assert fixed_resolution_problem((768, 512), (512, 512), random_crop=True) is None
    # sd-scripts' crop_target cuts a larger image around its face, and stops on a smaller one (it never enlarges)
    assert fixed_resolution_problem((768, 512), (512, 512), random_crop=False, face_crop=True) is None
    assert "smaller" in fixed_resolution_problem((768, 400), (512, 512), random_crop=False, face_crop=True)


def test_min_bucket_below_one_step_is_refused_instead_of_a_zero_wide_bucket():
    # snapped down to the step it would be 0: sd-scripts then divides by zero while listing its buckets
    with pytest.raises(UserError, match="min_bucket_reso 32 is less than bucket_reso_steps 64, .* set min_bucket_reso to 64"):
        bucket_list(BucketSettings((64, 128), enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128))
    # a resolution below one step is the resolution's problem, even where the form fitted min_bucket_reso to it
    with pytest.raises(UserError, match="resolution 63x63 is smaller than bucket_reso_steps 64, .* use a resolution of 64"):
        bucket_list(BucketSettings((63, 63), enable_bucket=True, min_bucket_reso=63, max_bucket_reso=1024))
    assert bucket_list(BucketSettings((64, 128), enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128)) == (
        (64, 64), (64, 128), (128, 64))
