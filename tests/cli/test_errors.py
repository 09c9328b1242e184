"""Bad input to every command of the ``fastvae`` CLI: exit status 2, one line on
stderr that names the culprit (the option, the file, the checkpoint), no traceback, nothing
trained, benchmarked or evaluated, nothing written to ``--out`` (or ``--json``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvae.cli import main
from fastvae.models.vae import build_vae
from fastvae.training import checkpoint

GPU = torch.cuda.is_available()


def _idx(shape, payload: bytes | None = None, dtype_code: int = 8) -> bytes:
    header = bytes([0, 0, dtype_code, len(shape)]) + np.array(shape, ">u4").tobytes()
    return header + (bytes(int(np.prod(shape))) if payload is None else payload)


def make_files(d: Path) -> None:
    """Every bad file of the table, in ``d``."""
    np.savez(d / "oned.npz", x=np.zeros(10))
    np.savez(d / "fived.npz", x=np.zeros((4, 1, 2, 3, 4)))
    np.savez(d / "above_one.npz", x=np.full((5, 4, 4), 1.5))
    np.savez(d / "negative.npz", x=np.full((5, 4, 4), -0.5))
    np.savez(d / "nan.npz", x=np.where(np.eye(4)[None] > 0, np.nan, 0.5).repeat(5, 0))
    np.savez(d / "one_image.npz", x=np.zeros((1, 4, 4)))
    np.savez(d / "complex.npz", x=np.zeros((5, 4, 4), dtype=np.complex64))
    np.savez(d / "strings.npz", x=np.array([["a", "b"]] * 3))
    np.savez(d / "no_arrays.npz")
    np.savez(d / "flat.npz", x=np.zeros((20, 30)))
    np.save(d / "objects.npy", np.array([{}, {}], dtype=object))
    (d / "objects.npz").write_bytes(_zip_with_npy(d / "objects.npy"))
    (d / "empty.npz").write_bytes(b"")
    (d / "garbage.npz").write_bytes(b"PK\x03\x04 garbage")
    (d / "empty-idx").write_bytes(b"")
    (d / "magic-idx").write_bytes(b"\x01\x02\x03\x04\x05")
    (d / "short-header-idx").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    (d / "truncated-idx").write_bytes(_idx((10, 4, 4), bytes(100)))
    (d / "forged-idx").write_bytes(_idx((2**32 - 1,) * 3, bytes(16)))
    (d / "labels-idx1-ubyte").write_bytes(_idx((10,)))
    (d / "nan-idx").write_bytes(_idx((3, 2, 2), np.full(12, np.nan, ">f4").tobytes(), 0x0D))
    good = gzip.compress(_idx((5, 4, 4)))
    (d / "corrupt-idx.gz").write_bytes(good[:12] + b"\xff" * 20 + good[32:])
    (d / "not-gzip-idx.gz").write_bytes(_idx((5, 4, 4)))
    (d / "a_file").write_text("not a directory")
    (d / "a_directory").mkdir()
    (d / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    (d / "empty.safetensors").write_bytes(b"")
    torch.manual_seed(0)
    other = {"input_shape": [1, 8, 8], "latent_dim": 2, "arch": "mlp", "hidden": [4],
             "likelihood": "bernoulli", "obs_logvar": 0.0, "logvar_limit": None}
    weights = build_vae(**other).state_dict()
    checkpoint.save(d / "other_model.safetensors", checkpoint.Checkpoint(other, weights))
    # checkpoints that the commands reading models refuse
    checkpoint.save(d / "user_networks.safetensors", checkpoint.Checkpoint({}, weights))
    checkpoint.save(d / "unknown_kind.safetensors",
                    checkpoint.Checkpoint({**other, "kind": "gan"}, weights))
    checkpoint.save(d / "unbuildable.safetensors",
                    checkpoint.Checkpoint({**other, "arch": "rnn"}, weights))
    checkpoint.save(d / "wrong_weights.safetensors",
                    checkpoint.Checkpoint({**other, "latent_dim": 3}, weights))
    from fastvae.models.vqvae import build_vqvae

    torch.manual_seed(0)
    fresh = build_vqvae((1, 8, 8), 4, codebook_dim=2, hidden=[4])  # no training steps
    checkpoint.save_vae(fresh, d / "vq_model.safetensors")
    gone = {"source": str(d / "gone.npz"), "key": None, "pixel_max": None, "shape": None,
            "channels": None, "image_size": None, "strict": False, "val_fraction": 0.1,
            "split_seed": 0}
    checkpoint.save(d / "data_gone.safetensors",
                    checkpoint.Checkpoint(other, weights, trainer_state={"data": gone}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(d / "plain.safetensors"))
    # folders of images
    from PIL import Image

    for name, sizes in (("broken_images", [(4, 4), (4, 4)]), ("mixed_sizes", [(4, 4), (5, 3)])):
        (d / name).mkdir()
        for i, size in enumerate(sizes):
            Image.new("L", size, 100 + i).save(d / name / f"{i}.png")
    (d / "broken_images" / "zero.png").write_bytes(b"")
    (d / "no_images").mkdir()
    (d / "no_images" / "notes.txt").write_text("no pictures here")


def _zip_with_npy(npy: Path) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(npy, "x.npy")
    return buffer.getvalue()


# (id, argv, words the one line must contain). "{d}" is the directory of the bad files.
TRAIN = [
    ("epochs_zero", ["--epochs", "0"], ["--epochs", ">= 1"]),
    ("cuda_graphs_on_cpu", ["--cuda-graphs", "--device", "cpu"], ["--cuda-graphs", "CUDA"]),
    ("epochs_float", ["--epochs", "1.5"], ["--epochs", "integer"]),
    ("batch_size_negative", ["--batch-size", "-1"], ["--batch-size"]),
    ("batch_size_word", ["--batch-size", "many"], ["--batch-size", "'many'"]),
    ("lr_negative", ["--lr", "-1"], ["--lr", "> 0"]),
    ("lr_nan", ["--lr", "nan"], ["--lr"]),
    ("lr_word", ["--lr", "fast"], ["--lr", "'fast'"]),
    ("latent_dim_zero", ["--latent-dim", "0"], ["--latent-dim"]),
    ("hidden_letters", ["--hidden", "a,b"], ["--hidden", "integers"]),
    ("hidden_zero", ["--hidden", "64,0"], ["--hidden", "positive"]),
    ("hidden_empty", ["--hidden", ""], ["--hidden"]),
    ("arch_unknown", ["--arch", "rnn"], ["--arch", "'rnn'"]),
    ("arch_conv_too_small", ["--arch", "conv", "--data", "{d}/flat.npz", "--shape", "1,1,30"],
     ["--arch conv", "(1, 1, 30)"]),
    ("likelihood_unknown", ["--likelihood", "poisson"], ["--likelihood", "'poisson'"]),
    ("obs_logvar_inf", ["--obs-logvar", "inf"], ["--obs-logvar", "finite"]),
    ("beta_negative", ["--beta", "-1"], ["--beta"]),
    ("beta_inf", ["--beta", "inf"], ["--beta", "finite"]),
    ("warmup_nan", ["--warmup", "nan"], ["--warmup"]),
    ("cycles_negative", ["--cycles", "-1"], ["--cycles"]),
    ("free_bits_negative", ["--free-bits", "-0.5"], ["--free-bits"]),
    ("grad_clip_zero", ["--grad-clip", "0"], ["--grad-clip", "> 0"]),
    ("logvar_limit_negative", ["--logvar-limit", "-3"], ["--logvar-limit"]),
    ("logvar_limit_nan", ["--logvar-limit", "nan"], ["--logvar-limit"]),
    ("seed_negative", ["--seed", "-1"], ["--seed"]),
    ("seed_huge", ["--seed", str(2**70)], ["--seed"]),
    ("device_unknown", ["--device", "tpu"], ["--device"]),
    ("device_bad_index", ["--device", "cuda:x"], ["--device"]),
    ("backend_unknown", ["--backend", "bogus"], ["--backend", "'bogus'"]),
    ("val_fraction_one", ["--val-fraction", "1"], ["--val-fraction"]),
    ("val_fraction_word", ["--val-fraction", "half"], ["--val-fraction"]),
    ("iwae_samples_negative", ["--iwae-samples", "-1"], ["--iwae-samples"]),
    ("on_nonfinite_unknown", ["--on-nonfinite", "ignore"], ["--on-nonfinite", "'ignore'"]),
    ("cycle_ratio_zero", ["--cycles", "2", "--cycle-ratio", "0"], ["--cycle-ratio", "> 0"]),
    ("cycle_ratio_above_one", ["--cycles", "2", "--cycle-ratio", "1.5"], ["--cycle-ratio"]),
    ("warmup_and_cycles", ["--warmup", "2", "--cycles", "2"], ["--warmup", "--cycles"]),
    ("beta_shape_unknown", ["--beta-shape", "cubic"], ["--beta-shape", "'cubic'"]),
    ("capacity_negative", ["--capacity", "-1"], ["--capacity"]),
    ("capacity_steps_negative", ["--capacity-steps", "-1"], ["--capacity-steps"]),
    ("mixtures_zero", ["--likelihood", "dmol", "--mixtures", "0"], ["--mixtures", ">= 1"]),
    ("bins_one", ["--likelihood", "dmol", "--bins", "1"], ["--bins", ">= 2"]),
    ("pixel_max_zero", ["--data", "{d}/flat.npz", "--pixel-max", "0"], ["--pixel-max", "> 0"]),
    ("pixel_max_with_digits", ["--pixel-max", "255"], ["pixel_max", "data files"]),
    ("key_unknown", ["--data", "{d}/flat.npz", "--key", "nope"], ["flat.npz", "'nope'", "x"]),
    ("shape_two_sizes", ["--data", "{d}/flat.npz", "--shape", "6,5"], ["--shape", "C,H,W"]),
    ("shape_other_size", ["--data", "{d}/flat.npz", "--shape", "1,5,5"], ["flat.npz", "1,5,5"]),
    ("shape_missing", ["--data", "{d}/flat.npz"], ["flat.npz", "--shape 1,1,30"]),
    ("unknown_option", ["--learning-rate", "1"], ["--learning-rate"]),
    # --data
    ("data_missing", ["--data", "{d}/missing.npz"], ["missing.npz", "no such"]),
    ("data_directory", ["--data", "{d}/a_directory"], ["a_directory", "no image files"]),
    ("data_folder_no_images", ["--data", "{d}/no_images"], ["no_images", "notes.txt"]),
    ("data_folder_mixed_sizes", ["--data", "{d}/mixed_sizes"],
     ["mixed_sizes", "4x4", "5x3", "--image-size"]),
    ("data_folder_with_key", ["--data", "{d}/broken_images", "--key", "x"],
     ["broken_images", "key"]),
    ("strict_broken_file", ["--data", "{d}/broken_images", "--strict"],
     ["broken_images", "zero.png", "empty"]),
    ("channels_two", ["--channels", "2"], ["--channels", "1 (grey) or 3"]),
    ("channels_with_file", ["--data", "{d}/flat.npz", "--channels", "1"],
     ["flat.npz", "channels", "folders"]),
    ("image_size_zero", ["--image-size", "0"], ["--image-size", ">= 1"]),
    ("image_size_with_digits", ["--image-size", "8"], ["image_size", "digits"]),
    ("data_empty_npz", ["--data", "{d}/empty.npz"], ["empty.npz", "cannot read"]),
    ("data_garbage_npz", ["--data", "{d}/garbage.npz"], ["garbage.npz", "cannot read"]),
    ("data_no_arrays", ["--data", "{d}/no_arrays.npz"], ["no_arrays.npz", "no arrays"]),
    ("data_objects", ["--data", "{d}/objects.npz"], ["objects.npz"]),
    ("data_1d", ["--data", "{d}/oned.npz"], ["oned.npz", "(10,)"]),
    ("data_5d", ["--data", "{d}/fived.npz"], ["fived.npz", "shape"]),
    ("data_above_one", ["--data", "{d}/above_one.npz"], ["above_one.npz", "[0, 1]"]),
    ("data_negative", ["--data", "{d}/negative.npz"], ["negative.npz", "[0, 1]"]),
    ("data_nan", ["--data", "{d}/nan.npz"], ["nan.npz", "non-finite"]),
    ("data_one_image", ["--data", "{d}/one_image.npz"], ["one_image.npz", "2 images"]),
    ("data_complex", ["--data", "{d}/complex.npz"], ["complex.npz", "complex64"]),
    ("data_strings", ["--data", "{d}/strings.npz"], ["strings.npz", "numeric"]),
    ("data_empty_idx", ["--data", "{d}/empty-idx"], ["empty-idx", "IDX"]),
    ("data_bad_magic", ["--data", "{d}/magic-idx"], ["magic-idx", "magic"]),
    ("data_short_header", ["--data", "{d}/short-header-idx"], ["short-header-idx", "header"]),
    ("data_truncated_idx", ["--data", "{d}/truncated-idx"], ["truncated-idx", "truncated"]),
    ("data_forged_idx", ["--data", "{d}/forged-idx"], ["forged-idx", "truncated"]),
    ("data_labels_idx", ["--data", "{d}/labels-idx1-ubyte"], ["labels-idx1-ubyte", "(10,)"]),
    ("data_nan_idx", ["--data", "{d}/nan-idx"], ["nan-idx", "non-finite"]),
    ("data_corrupt_gzip", ["--data", "{d}/corrupt-idx.gz"], ["corrupt-idx.gz", "cannot read"]),
    ("data_not_gzip", ["--data", "{d}/not-gzip-idx.gz"], ["not-gzip-idx.gz", "cannot read"]),
    # --out and --resume
    ("out_is_a_file", ["--out", "{d}/a_file"], ["--out", "a_file", "not a directory"]),
    ("out_cannot_be_created", ["--out", "{d}/a_file/run"], ["--out", "a_file/run"]),
    ("resume_missing", ["--resume", "{d}/missing.safetensors"], ["--resume", "missing"]),
    ("resume_junk", ["--resume", "{d}/junk.safetensors"], ["--resume", "junk.safetensors"]),
    ("resume_empty", ["--resume", "{d}/empty.safetensors"], ["--resume", "empty.safetensors"]),
    ("resume_directory", ["--resume", "{d}/a_directory"],
     ["--resume", "a_directory", "without a checkpoint.safetensors"]),
    ("resume_other_model", ["--resume", "{d}/other_model.safetensors"],
     ["--resume", "other_model.safetensors", "another configuration"]),
    # --quantizer vq and its options
    ("quantizer_unknown", ["--quantizer", "pq"], ["--quantizer", "'pq'"]),
    ("codebook_size_zero", ["--quantizer", "vq", "--codebook-size", "0"],
     ["--codebook-size", ">= 1"]),
    ("codebook_size_without_quantizer", ["--codebook-size", "64"],
     ["--codebook-size", "--quantizer vq"]),
    ("codebook_dim_word", ["--quantizer", "vq", "--codebook-dim", "wide"],
     ["--codebook-dim", "'wide'"]),
    ("num_tokens_zero", ["--quantizer", "vq", "--num-tokens", "0"], ["--num-tokens", ">= 1"]),
    ("num_tokens_with_conv", ["--quantizer", "vq", "--arch", "conv", "--num-tokens", "2"],
     ["--num-tokens", "--arch mlp"]),
    ("decay_one", ["--quantizer", "vq", "--decay", "1"], ["--decay", "[0, 1)"]),
    ("decay_nan", ["--quantizer", "vq", "--decay", "nan"], ["--decay"]),
    ("decay_without_quantizer", ["--decay", "0.9"], ["--decay", "--quantizer vq"]),
    ("commitment_negative", ["--quantizer", "vq", "--commitment", "-1"],
     ["--commitment", ">= 0"]),
    ("commitment_inf", ["--quantizer", "vq", "--commitment", "inf"], ["--commitment", "finite"]),
    ("dead_code_threshold_negative", ["--quantizer", "vq", "--dead-code-threshold", "-1"],
     ["--dead-code-threshold", ">= 0"]),
    ("vq_with_kl_options", ["--quantizer", "vq", "--beta", "4", "--free-bits", "1"],
     ["--beta", "--free-bits", "KL", "VQ-VAE"]),
    ("vq_with_latent_dim", ["--quantizer", "vq", "--latent-dim", "4"], ["--latent-dim"]),
    ("levels_word", ["--quantizer", "fsq", "--levels", "8,x"], ["--levels", "integers"]),
    ("levels_one", ["--quantizer", "fsq", "--levels", "8,1"],
     ["--levels: entry 2 is 1", "at least 3 levels"]),
    ("levels_one_in_middle", ["--quantizer", "fsq", "--levels", "8,1,5"],
     ["--levels: entry 2 is 1"]),
    ("levels_two", ["--quantizer", "fsq", "--levels", "8,2"],
     ["--levels: entry 2 is 2", "at least 3 levels", "which the CLI does not offer"]),
    ("levels_huge", ["--quantizer", "fsq", "--levels", "33554432"],
     ["--levels: entry 1 is 33554432", "2**24"]),
    ("levels_codebook_beyond_int64", ["--quantizer", "fsq", "--levels", ",".join(["16"] * 16)],
     ["--levels", "2**63 - 1"]),
    ("levels_empty_entry", ["--quantizer", "fsq", "--levels", "8,,5"],
     ["argument --levels: expected comma-separated integers, got '8,,5'"]),
    ("levels_trailing_comma", ["--quantizer", "fsq", "--levels", "8,5,"], ["--levels", "'8,5,'"]),
    ("levels_empty", ["--quantizer", "fsq", "--levels", ""], ["--levels", "integers"]),
    ("levels_zero", ["--quantizer", "fsq", "--levels", "8,0"], ["--levels", "positive"]),
    ("hidden_empty_entry", ["--hidden", "64,,32"], ["--hidden", "comma-separated", "'64,,32'"]),
    ("shape_empty_entry", ["--data", "{d}/flat.npz", "--shape", "1,,1,30"],
     ["--shape", "'1,,1,30'"]),
    ("levels_with_vq", ["--quantizer", "vq", "--levels", "8,5"], ["--levels", "--quantizer vq"]),
    ("num_quantizers_zero", ["--quantizer", "rvq", "--num-quantizers", "0"],
     ["--num-quantizers", ">= 1"]),
    ("num_quantizers_with_fsq", ["--quantizer", "fsq", "--num-quantizers", "2"],
     ["--num-quantizers", "--quantizer fsq"]),
    ("entropy_weight_negative", ["--quantizer", "lfq", "--entropy-weight", "-1"],
     ["--entropy-weight", ">= 0"]),
    ("entropy_weight_without_quantizer", ["--entropy-weight", "0.1"],
     ["--entropy-weight", "--quantizer"]),
    ("lfq_codebook_not_power_of_2", ["--quantizer", "lfq", "--codebook-size", "100"],
     ["--codebook-size", "power of 2"]),
    ("vq_resume_a_vae", ["--quantizer", "vq", "--resume", "{d}/other_model.safetensors"],
     ["--resume", "other_model.safetensors", "another configuration", "kind"]),
]
if not GPU:
    TRAIN += [("device_cuda_without_gpu", ["--device", "cuda"], ["--device cuda", "GPU"]),
              ("backend_cuda_without_gpu", ["--backend", "cuda"], ["--backend", "'cuda'"])]

BENCH = [
    ("ops_unknown", ["--ops", "nope"], ["--ops", "nope"]),
    ("ops_empty", ["--ops", ","], ["--ops", "comma-separated names"]),
    ("ops_empty_entry", ["--ops", "vq,,fsq"], ["--ops", "comma-separated names", "'vq,,fsq'"]),
    ("sizes_empty_entry", ["--sizes", "64x784,,4096x784"], ["--sizes", "'64x784,,4096x784'"]),
    ("sizes_trailing_comma", ["--sizes", "64x784,"], ["--sizes", "'64x784,'"]),
    ("dtypes_empty_entry", ["--dtypes", "float32,"], ["--dtypes", "'float32,'"]),
    ("directions_empty_entry", ["--directions", "fwd,,fwd+bwd"], ["--directions", "'fwd,,"]),
    ("backends_empty_entry", ["--backends", "torch,,cpu"], ["--backends", "'torch,,cpu'"]),
    ("train_step_empty_entry", ["--train-step", "64x784,,"], ["--train-step"]),
    ("vq_sizes_empty_entry", ["--ops", "vq", "--vq-sizes", "64x32x8,,64x32x8"],
     ["--vq-sizes", "comma-separated sizes"]),
    ("vq_impls_empty_entry", ["--ops", "vq", "--vq-impls", "fastvae:torch,"],
     ["--vq-impls", "comma-separated names"]),
    ("fsq_sizes_empty_level", ["--ops", "fsq", "--fsq-sizes", "64x[8,,5]"],
     ["--fsq-sizes", "'64x[8,,5]'"]),
    ("fsq_sizes_empty_entry", ["--ops", "fsq", "--fsq-sizes", "64x[8,5],,64x[4]"],
     ["--fsq-sizes", "comma-separated sizes"]),
    ("sizes_one_number", ["--sizes", "3"], ["--sizes", "'3'"]),
    ("sizes_zero", ["--sizes", "0x784"], ["--sizes", "'0x784'"]),
    ("sizes_letters", ["--sizes", "axb"], ["--sizes"]),
    ("dtypes_int", ["--dtypes", "int8"], ["--dtypes", "int8"]),
    ("dtypes_empty", ["--dtypes", ""], ["--dtypes"]),
    ("directions_unknown", ["--directions", "bwd"], ["--directions", "bwd"]),
    ("backends_unknown", ["--backends", "auto"], ["--backends", "auto"]),
    ("backends_empty", ["--backends", ","], ["--backends"]),
    ("device_unknown", ["--device", "tpu"], ["--device", "'tpu'"]),
    ("train_step_one_number", ["--train-step", "3"], ["--train-step", "'3'"]),
    ("out_is_a_file", ["--out", "{d}/a_file"], ["--out", "a_file"]),
    ("unknown_option", ["--size", "3"], ["--size"]),
    ("threads_zero", ["--threads", "0"], ["--threads", ">= 1"]),
    ("threads_letters", ["--threads", "two"], ["--threads", "'two'"]),
    ("small_batch_unknown_op", ["--small-batch", "--ops", "nope"], ["--ops", "nope"]),
    ("vq_sizes_two_numbers", ["--ops", "vq", "--vq-sizes", "64x32"], ["--vq-sizes", "'64x32'"]),
    ("vq_sizes_zero", ["--ops", "vq", "--vq-sizes", "0x32x8"], ["--vq-sizes", "'0x32x8'"]),
    ("vq_impls_unknown", ["--ops", "vq", "--vq-impls", "nope"], ["--vq-impls", "nope"]),
    ("vq_rounds_zero", ["--ops", "vq", "--vq-rounds", "0"], ["--vq-rounds", "0"]),
    ("quantizer_rounds_negative", ["--ops", "tokenizers", "--quantizer-rounds", "-1"],
     ["--quantizer-rounds", "-1"]),
    ("rvq_sizes_three_numbers", ["--ops", "rvq", "--rvq-sizes", "64x8x32"],
     ["--rvq-sizes", "'64x8x32'"]),
    ("rvq_impls_unknown", ["--ops", "rvq", "--rvq-impls", "cdist"], ["--rvq-impls", "cdist"]),
    ("fsq_sizes_no_levels", ["--ops", "fsq", "--fsq-sizes", "64x8"], ["--fsq-sizes", "'64x8'"]),
    ("fsq_sizes_level_one", ["--ops", "fsq", "--fsq-sizes", "64x[8,1]"],
     ["--fsq-sizes", "'64x[8,1]'"]),
    ("fsq_impls_empty", ["--ops", "fsq", "--fsq-impls", ","],
     ["--fsq-impls", "comma-separated"]),
    ("lfq_sizes_zero_bits", ["--ops", "lfq", "--lfq-sizes", "64x0"], ["--lfq-sizes", "'64x0'"]),
    ("lfq_impls_unknown_unselected", ["--ops", "vq", "--lfq-impls", "nope"],
     ["--lfq-impls", "nope"]),
    ("memory_limit_negative", ["--ops", "lfq", "--memory-limit-gb", "-1"],
     ["--memory-limit-gb", "-1"]),
    ("memory_only_without_memory", ["--ops", "lfq", "--memory-only", "--no-memory"],
     ["--memory-only", "--no-memory"]),
    ("memory_limit_nan", ["--ops", "lfq", "--memory-limit-gb", "nan"], ["--memory-limit-gb"]),
    ("memory_limit_word", ["--ops", "lfq", "--memory-limit-gb", "lots"],
     ["--memory-limit-gb", "'lots'"]),
]
if not GPU:
    BENCH += [("backends_cuda_without_gpu", ["--backends", "cuda"], ["--backends", "'cuda'"]),
              ("device_cuda_without_gpu", ["--device", "cuda"], ["--device cuda", "GPU"])]

# The commands that read a checkpoint: what is wrong with it, with the held-out data, with
# each option. "{ok}" is a good VAE checkpoint (1x8x8) that records no training data.
CHECKPOINT_ROWS = [
    ("checkpoint_missing", ["{d}/missing.safetensors"], ["missing.safetensors", "cannot read"]),
    ("checkpoint_junk", ["{d}/junk.safetensors"], ["junk.safetensors", "not a readable"]),
    ("checkpoint_empty", ["{d}/empty.safetensors"], ["empty.safetensors"]),
    ("checkpoint_directory", ["{d}/a_directory"],
     ["a_directory", "without a checkpoint.safetensors"]),
    ("checkpoint_not_fastvae", ["{d}/plain.safetensors"],
     ["plain.safetensors", "not a fastvae checkpoint"]),
    ("checkpoint_user_networks", ["{d}/user_networks.safetensors"],
     ["user_networks.safetensors", "user networks", "cannot be rebuilt"]),
    ("checkpoint_unknown_kind", ["{d}/unknown_kind.safetensors"],
     ["unknown_kind.safetensors", "'gan'"]),
    ("checkpoint_unbuildable", ["{d}/unbuildable.safetensors"],
     ["unbuildable.safetensors", "cannot be built", "'rnn'"]),
    ("checkpoint_wrong_weights", ["{d}/wrong_weights.safetensors"],
     ["wrong_weights.safetensors", "weights of another model"]),
    ("device_unknown", ["{ok}", "--device", "tpu"], ["--device"]),
    ("backend_unknown", ["{ok}", "--backend", "bogus"], ["--backend", "'bogus'"]),
    ("unknown_option", ["{ok}", "--frobnicate"], ["--frobnicate"]),
    ("no_checkpoint", [], ["checkpoint"]),
]
HELD_OUT_ROWS = [
    ("data_not_recorded", ["{ok}"], ["other_model.safetensors", "does not record", "--data"]),
    ("data_recorded_gone", ["{d}/data_gone.safetensors"],
     ["data_gone.safetensors", "gone.npz", "no such"]),
    ("data_missing", ["{ok}", "--data", "{d}/missing.npz"], ["missing.npz", "no such"]),
    ("data_shape_mismatch", ["{ok}", "--data", "{d}/flat.npz", "--shape", "1,5,6"],
     ["flat.npz", "(1, 5, 6)", "input_shape (1, 8, 8)"]),
    ("data_folder_shape_mismatch", ["{ok}", "--data", "{d}/mixed_sizes", "--image-size", "4"],
     ["mixed_sizes", "(1, 4, 4)", "(1, 8, 8)", "--image-size"]),
    ("key_unknown", ["{ok}", "--data", "{d}/flat.npz", "--key", "nope"], ["'nope'"]),
    ("key_without_data", ["{ok}", "--key", "x"], ["--key", "--data"]),
    ("pixel_max_zero", ["{ok}", "--data", "{d}/flat.npz", "--pixel-max", "0"],
     ["--pixel-max", "> 0"]),
    ("shape_two_sizes", ["{ok}", "--data", "{d}/flat.npz", "--shape", "6,5"],
     ["--shape", "C,H,W"]),
    ("channels_two", ["{ok}", "--channels", "2"], ["--channels"]),
    ("image_size_zero", ["{ok}", "--image-size", "0"], ["--image-size"]),
    ("strict_broken_file", ["{ok}", "--data", "{d}/broken_images", "--strict"],
     ["zero.png", "empty"]),
]
OUT_ROWS = [
    ("out_is_a_directory", ["{ok}", "--out", "{d}/a_directory"], ["--out", "a_directory"]),
    ("out_in_missing_directory", ["{ok}", "--out", "{d}/nowhere/x.png"], ["--out", "nowhere"]),
    ("out_not_a_picture", ["{ok}", "--out", "{d}/x.txt"], ["--out", "x.txt", "suffix"]),
]
EVAL = [*CHECKPOINT_ROWS, *HELD_OUT_ROWS,
        ("iwae_samples_negative", ["{ok}", "--iwae-samples", "-1"], ["--iwae-samples"]),
        ("batch_size_zero", ["{ok}", "--batch-size", "0"], ["--batch-size", ">= 1"]),
        ("seed_negative", ["{ok}", "--seed", "-1"], ["--seed"]),
        ("json_is_a_directory", ["{ok}", "--json", "{d}/a_directory"],
         ["--json", "a_directory"]),
        ("json_in_missing_directory", ["{ok}", "--json", "{d}/nowhere/m.json"],
         ["--json", "nowhere"])]
SAMPLE = [*CHECKPOINT_ROWS, *OUT_ROWS,
          ("vq_without_training_steps", ["{d}/vq_model.safetensors"],
           ["vq_model.safetensors", "VQ-VAE", "prior", "--prior uniform"]),
          ("prior_unknown", ["{d}/vq_model.safetensors", "--prior", "gaussian"],
           ["--prior", "'gaussian'"]),
          ("prior_with_a_vae", ["{ok}", "--prior", "uniform"], ["--prior", "VQ-VAE", "VAE"]),
          ("n_zero", ["{ok}", "--n", "0"], ["--n", ">= 1"]),
          ("ncols_word", ["{ok}", "--ncols", "many"], ["--ncols", "'many'"]),
          ("seed_huge", ["{ok}", "--seed", str(2**40)], ["--seed"]),
          ("data_not_an_option", ["{ok}", "--data", "{d}/flat.npz"], ["--data"])]
RECONSTRUCT = [*CHECKPOINT_ROWS, *HELD_OUT_ROWS, *OUT_ROWS,
               ("n_zero", ["{ok}", "--n", "0"], ["--n"]),
               ("ncols_zero", ["{ok}", "--ncols", "0"], ["--ncols"])]
INTERPOLATE = [*CHECKPOINT_ROWS, *HELD_OUT_ROWS, *OUT_ROWS,
               ("steps_one", ["{ok}", "--data", "{d}/flat.npz", "--shape", "1,1,30",
                              "--steps", "1"], ["--steps", ">= 2"]),
               ("pairs_zero", ["{ok}", "--pairs", "0"], ["--pairs"]),
               ("method_unknown", ["{ok}", "--method", "cubic"], ["--method", "'cubic'"]),
               ("vq_model", ["{d}/vq_model.safetensors", "--data", "{d}/flat.npz", "--shape",
                             "1,8,8"], ["vq_model.safetensors", "VQ-VAE", "interpolate"])]
READERS = {"eval": EVAL, "sample": SAMPLE, "reconstruct": RECONSTRUCT,
           "interpolate": INTERPOLATE}

OTHER = [
    ("info_argument", ["info", "--verbose"], ["--verbose"]),
    ("no_command", [], ["command"]),
    ("unknown_command", ["serve"], ["'serve'"]),
]

TABLE = ([(f"train-{i}", ["train", *argv], w) for i, argv, w in TRAIN]
         + [(f"bench-{i}", ["bench", *argv], w) for i, argv, w in BENCH]
         + [(f"{c}-{i}", [c, *argv], w) for c, rows in READERS.items() for i, argv, w in rows]
         + OTHER)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bad_files")
    make_files(d)
    return d


@pytest.mark.parametrize(("argv", "words"), [pytest.param(a, w, id=i) for i, a, w in TABLE])
def test_bad_cli_input(argv, words, bad_files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written by mistake lands here
    argv = [a.replace("{ok}", "{d}/other_model.safetensors").replace("{d}", str(bad_files))
            for a in argv]
    if argv[:1] == ["train"]:
        argv += ["--epochs", "1", "--no-progress", "--no-images", "--iwae-samples", "0"]
        if "--out" not in argv:
            argv += ["--out", str(tmp_path / "out")]
    elif argv[:1] == ["bench"] and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    elif argv[:1] in (["reconstruct"], ["interpolate"]) and argv[1:]:
        argv += ["--no-progress"]
    elif argv[:1] == ["eval"]:
        argv += ["--no-progress", "--iwae-samples", "2"]
        if "--json" not in argv:
            argv += ["--json", str(tmp_path / "out" / "eval.json")]
            (tmp_path / "out").mkdir()
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, f"exit status {code}\n{captured.out}\n{err}"
    assert err.count("\n") == 1, f"not one line:\n{err}"
    assert err.startswith("fastvae"), err
    assert "Traceback" not in err
    missing = [w for w in words if w not in err]
    assert not missing, f"{err!r} does not name {missing}"
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), "files were written"
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "benchmarks").exists()
    assert not list(tmp_path.glob("*.png")), "a picture was written"
    assert not list(bad_files.glob("*.json"))
    assert not list(bad_files.glob("*.png"))


def test_table_covers_every_option():
    """Every option of every command has at least one bad-input row."""
    from fastvae.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    harmless = {"--help", "--no-images", "--no-progress", "--amp", "--compile", "--no-compile",
                "--no-train-step", "--no-memory", "--default-heap"}
    assert set(sub.choices) == {"train", "bench", "info", *READERS}
    for command, rows in (("train", TRAIN), ("bench", BENCH), *READERS.items()):
        options = {o for a in sub.choices[command]._actions for o in a.option_strings
                   if o.startswith("--")} - harmless
        covered = {a for _, argv, _ in rows for a in argv if a.startswith("--")}
        assert options <= covered, f"{command}: no bad-input row for {options - covered}"
