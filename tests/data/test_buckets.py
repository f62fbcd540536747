"""Aspect-ratio buckets, preparing one image for its bucket, and bucket-pure batches."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import TrainConfig
from core.data.buckets import (BucketBatchSampler, bucket_for, bucket_info, choose_bucket, make_buckets,
                               prepare_image)
from tests.fixtures.image_folders import photo


@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_buckets_are_multiples_of_64_within_the_area_and_side_limits(resolution):
    buckets = make_buckets(resolution, 256, 2048)
    assert (resolution, resolution) in buckets
    assert len(buckets) == len(set(buckets)) > 5
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert width * height <= resolution ** 2
        assert 256 <= width <= 2048 and 256 <= height <= 2048
        assert (height, width) in buckets  # every wide shape has its tall twin


def test_buckets_at_512_reach_4_to_1_both_ways():
    buckets = make_buckets(512)
    assert (1024, 256) in buckets and (256, 1024) in buckets
    assert (576, 448) in buckets and (448, 576) in buckets


def test_the_square_is_there_even_outside_the_side_limits():
    assert (512, 512) in make_buckets(512, min_reso=64, max_reso=384)
    assert make_buckets(64) == [(64, 64)]


def test_a_minimum_that_leaves_only_the_square_is_lowered_so_small_runs_still_bucket():
    buckets = make_buckets(128)  # the default min_reso 256 would leave only the square
    assert (256, 64) in buckets and (64, 256) in buckets and (128, 128) in buckets


def test_a_wide_panorama_gets_a_wide_bucket_instead_of_being_cut_to_a_square():
    buckets = make_buckets(512)
    assert choose_bucket(4000, 1000, buckets) == (1024, 256)
    assert choose_bucket(1000, 4000, buckets) == (256, 1024)
    assert choose_bucket(10000, 100, buckets) == (1024, 256)  # wider than any bucket: the widest
    assert choose_bucket(777, 777, buckets) == (512, 512)
    width, height = choose_bucket(1920, 1080, buckets)
    assert width > height and abs(math.log(width / height) - math.log(1920 / 1080)) < 0.1


def test_an_aspect_ratio_tie_goes_to_the_larger_bucket():
    assert choose_bucket(100, 100, [(128, 64), (128, 256)]) == (128, 256)
    assert choose_bucket(200, 100, [(128, 64), (256, 128)]) == (256, 128)


def test_bucket_for_follows_the_bucketing_switch():
    on = TrainConfig(resolution=512, bucketing=True)
    off = TrainConfig(resolution=512, bucketing=False)
    assert bucket_for(4000, 1000, on) == (1024, 256)
    assert bucket_for(4000, 1000, off) == (512, 512)
    narrow = TrainConfig(resolution=512, bucketing=True, min_bucket_reso=384, max_bucket_reso=640)
    assert all(384 <= side <= 640 for side in bucket_for(4000, 1000, narrow))


def test_bucket_info_is_what_kohya_writes_in_the_metadata():
    info = bucket_info([(4000, 1000), (800, 800), (810, 800)], [(1024, 256), (512, 512), (512, 512)])
    assert info["buckets"] == {"0": {"resolution": [512, 512], "count": 2},
                               "1": {"resolution": [1024, 256], "count": 1}}
    assert 0 < info["mean_img_ar_error"] < 0.01


# --- one image ---------------------------------------------------------------------------

def test_a_prepared_image_is_a_float_tensor_in_minus_one_to_one_of_the_bucket_size():
    prepared = prepare_image(photo("coffee.png", 192), (128, 64))
    assert prepared.pixels.dtype == torch.float32 and prepared.pixels.shape == (3, 64, 128)
    assert -1.0 <= float(prepared.pixels.min()) < float(prepared.pixels.max()) <= 1.0
    assert prepared.original_size == (128, 192) and prepared.target_size == (64, 128)


def test_colours_map_exactly_to_minus_one_and_one_and_nothing_is_padded():
    image = Image.new("RGB", (300, 100), (255, 0, 255))
    pixels = prepare_image(image, (128, 128)).pixels
    assert torch.equal(pixels[0], torch.ones(128, 128)) and torch.equal(pixels[1], -torch.ones(128, 128))


def test_the_whole_panorama_stays_when_its_bucket_matches_its_shape():
    panorama = photo("motorcycle_left.png", 256).convert("RGB").resize((256, 64))
    prepared = prepare_image(panorama, choose_bucket(256, 64, make_buckets(128)))
    assert prepared.target_size == (64, 256) and prepared.crop_top_left == (0, 0)
    expected = torch.from_numpy(np.asarray(panorama, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert torch.allclose(prepared.pixels, expected)


def test_a_center_crop_cuts_equally_from_both_sides_and_records_where():
    wide = prepare_image(Image.new("RGB", (200, 100)), (64, 64))  # resized to 128x64: 32 px each side
    assert wide.crop_top_left == (0, 32)
    tall = prepare_image(Image.new("RGB", (100, 300)), (64, 64))  # resized to 64x192
    assert tall.crop_top_left == (64, 0)


def test_a_center_crop_keeps_the_middle_of_the_picture():
    array = np.zeros((64, 192, 3), dtype=np.uint8)
    array[:, 64:128] = 255  # a white middle third
    prepared = prepare_image(Image.fromarray(array), (64, 64))
    assert float(prepared.pixels.mean()) > 0.95


def test_a_random_crop_is_reproducible_with_its_rng_and_stays_inside():
    image = photo("coffee.png", 192)  # 192 x 128
    corners = {prepare_image(image, (64, 64), center_crop=False, rng=random.Random(s)).crop_top_left
               for s in range(20)}
    assert len(corners) > 3
    assert all(top == 0 and 0 <= left <= 32 for top, left in corners)
    first = prepare_image(image, (64, 64), center_crop=False, rng=random.Random(7))
    again = prepare_image(image, (64, 64), center_crop=False, rng=random.Random(7))
    assert first.crop_top_left == again.crop_top_left and torch.equal(first.pixels, again.pixels)


def test_flipping_mirrors_the_pixels_and_the_crop_corner():
    image = photo("coffee.png", 192)
    plain = prepare_image(image, (64, 64), center_crop=False, rng=random.Random(3))
    flipped = prepare_image(image, (64, 64), center_crop=False, flip=True, rng=random.Random(3))
    assert torch.equal(flipped.pixels, plain.pixels.flip(-1))
    spare = 96 - 64
    assert flipped.crop_top_left == (plain.crop_top_left[0], spare - plain.crop_top_left[1])


def test_grey_and_rgba_images_come_out_as_three_channels():
    for image in (photo("camera.png", 96), photo("logo.png", 96)):
        assert prepare_image(image, (64, 64)).pixels.shape == (3, 64, 64)


# --- batches -----------------------------------------------------------------------------

MIXED = [(64, 64)] * 7 + [(128, 64)] * 5 + [(64, 128)] * 2


def test_the_sampler_never_mixes_buckets_in_a_batch():
    sampler = BucketBatchSampler(MIXED, batch_size=3, seed=1)
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert len({MIXED[i] for i in batch}) == 1


def test_the_sampler_repeats_the_same_order_for_the_same_seed_and_epoch():
    one = BucketBatchSampler(MIXED, batch_size=3, seed=1)
    two = BucketBatchSampler(MIXED, batch_size=3, seed=1)
    one.set_epoch(4)
    two.set_epoch(4)
    assert list(one) == list(two) == one.batches_for_epoch(4)
    assert one.batches_for_epoch(0) != one.batches_for_epoch(1)
    assert one.batches_for_epoch(0) != BucketBatchSampler(MIXED, 3, seed=2).batches_for_epoch(0)


@pytest.mark.parametrize("repeats", [1, 3])
def test_no_image_is_ever_dropped_and_partial_batches_are_kept(repeats):
    sampler = BucketBatchSampler(MIXED, batch_size=4, seed=0, repeats=repeats)
    batches = list(sampler)
    flat = sorted(i for batch in batches for i in batch)
    assert flat == sorted(list(range(len(MIXED))) * repeats)
    assert len(sampler) == len(batches)
    assert any(len(batch) < 4 for batch in batches)


def test_resume_mid_epoch_skips_the_batches_already_trained():
    sampler = BucketBatchSampler(MIXED, batch_size=2, seed=5)
    full = sampler.batches_for_epoch(3)
    sampler.set_epoch(3, skip=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    sampler.set_epoch(4)
    assert len(list(sampler)) == len(full)


def test_without_shuffle_batches_follow_the_dataset_order():
    sampler = BucketBatchSampler(MIXED, batch_size=4, seed=0, shuffle=False)
    flat = [i for batch in sampler for i in batch]
    groups = [flat[:7], flat[7:9], flat[9:]]
    assert sorted(map(sorted, groups)) == sorted([list(range(7)), [12, 13], list(range(7, 12))])
    assert all(group == sorted(group) for group in groups)


def test_the_sampler_drives_a_torch_dataloader():
    class Sizes(torch.utils.data.Dataset):
        def __len__(self):
            return len(MIXED)

        def __getitem__(self, index):
            width, height = MIXED[index]
            return torch.zeros(3, height, width)

    sampler = BucketBatchSampler(MIXED, batch_size=3, seed=0)
    loader = torch.utils.data.DataLoader(Sizes(), batch_sampler=sampler)
    shapes = [tuple(batch.shape) for batch in loader]
    assert len(shapes) == len(sampler) and sum(s[0] for s in shapes) == len(MIXED)


def test_bad_sampler_settings_are_refused():
    with pytest.raises(ValueError):
        BucketBatchSampler(MIXED, batch_size=0, seed=0)


def test_a_repeated_image_does_not_share_a_batch_with_itself_when_it_can_be_avoided():
    sampler = BucketBatchSampler([(64, 64)] * 6, batch_size=4, seed=0, repeats=5)
    for epoch in range(10):
        batches = sampler.batches_for_epoch(epoch)
        assert all(len(set(batch)) == len(batch) for batch in batches)
        assert sorted(i for batch in batches for i in batch) == sorted(list(range(6)) * 5)
        assert len(batches) == len(sampler) == 8


def test_a_bucket_of_one_image_repeated_still_fills_whole_batches():
    sampler = BucketBatchSampler([(64, 64)], batch_size=4, seed=0, repeats=10)
    assert sorted(len(batch) for batch in sampler) == [2, 4, 4]
