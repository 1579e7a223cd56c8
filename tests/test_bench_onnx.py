"""The bench's models and metrics on known inputs: the ONNX models' metrics and targets (bench/onnx_models.py,
bench/report.py) and the digits reference model (bench/tasks.py)."""
from __future__ import annotations

import numpy as np
import pytest

from bench import report
from bench.baselines import INT8, int8_per_channel
from bench.onnx_models import classifier_metrics, imagenet_batch, ocr_metrics, text_images


def test_classifier_metrics_on_known_logits():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((50, 1000)).astype(np.float32)
    same = classifier_metrics(ref, ref.copy())
    assert same["top1_agreement"] == 1.0 and same["top5_overlap"] == 1.0 and abs(same["kl"]) < 1e-9
    swapped = ref.copy()
    top = ref.argmax(1)
    swapped[np.arange(50), top] = ref.min(1) - 1  # every top-1 class falls to the bottom
    m = classifier_metrics(ref, swapped)
    assert m["top1_agreement"] == 0.0 and m["top5_overlap"] == pytest.approx(0.8) and m["kl"] > 0


def test_imagenet_batch_layout_and_normalisation():
    crops = np.zeros((2, 4, 4, 3), np.uint8)
    crops[..., 0] = 255
    x = imagenet_batch(crops)
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    assert x[0, 0, 0, 0] == pytest.approx((1 - 0.485) / 0.229) and x[0, 1, 0, 0] == pytest.approx(-0.456 / 0.224)


def test_ocr_metrics_and_rendered_images():
    assert ocr_metrics([(1, 2, 3), (4, 5)], [(1, 2, 3), (4, 6)]) == {"string_agreement": 0.5,
                                                                    "char_agreement": 0.75}
    assert ocr_metrics([(1, 2, 3, 4)], [(2, 3, 4)])["char_agreement"] == 0.75  # one deletion
    texts, images = text_images(3, seed=5)
    again, images2 = text_images(3, seed=5)
    assert texts == again and np.array_equal(images, images2) and images.shape == (3, 1, 64, 192)
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05  # text on a background


def _row(method, bits, value, setting="", **extra):
    return {"method": method, "setting": setting, "bits_per_weight": bits, "metrics": {"top1_agreement": value},
            **extra}


def test_report_onnx_targets(tmp_path):
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    assert int8_per_channel({"w": (w, None)}, str(tmp_path)).method == INT8  # the rows the targets look for
    data = {"primary": "top1_agreement", "onnx_source": True, "onnx_file_bytes": 1000, "rows": [
        _row(INT8, 8.0, 0.92), _row("nncodec", 3.0, 0.80), _row("nncodec", 5.0, 0.95),
        _row("aqm", 3.0, 0.93, "4-bit", whole_file_ratio=8.5), _row("aqm", 2.0, 0.80, "3-bit", whole_file_ratio=11)]}
    checks = report.checks(data)
    assert checks["whole file >= 8x smaller with top1_agreement >= int8 per-channel's"]["answer"] is True
    # NNCodec reaches 0.93 at 3 + 0.13/0.15*2 = 4.73 b/w: 3.0/4.73 = 0.63x; 0.80 at "at most" 3.0 b/w: 0.67x
    target = checks["aqm <= 0.9x NNCodec at every rate"]
    assert target["answer"] is True and target["worst"] == pytest.approx(2 / 3)
    untuned = "whole file >= 6x smaller without fine-tuning with top1_agreement >= int8 per-channel's"
    assert checks[untuned]["answer"] is True
    data["rows"][3]["whole_file_ratio"] = 7.9
    assert report.checks(data)["whole file >= 8x smaller with top1_agreement >= int8 per-channel's"]["answer"] is False
    data["rows"][3]["method"] = "aqm+finetune"  # a fine-tuned file does not count without fine-tuning
    assert report.checks(data)[untuned]["answer"] is False


def test_report_finetuned_target_of_efficientnet():
    rows = [_row(INT8, 8.0, 0.91), _row("aqm+finetune", 3.0, 0.96, "3-bit", whole_file_ratio=9.8),
            _row("aqm+finetune", 2.5, 0.90, "2.5-bit", whole_file_ratio=11)]
    data = {"primary": "top1_agreement", "model": "EfficientNet-Lite0 (ImageNet)", "rows": rows}
    key = "whole file >= 10x smaller after fine-tuning with top1_agreement >= 0.95"
    got = report.checks(data)[key]
    assert got["answer"] is False and "11.00x whole file, top1_agreement=0.9000" in got["best_aqm"]
    rows[1]["whole_file_ratio"] = 10.2
    assert report.checks(data)[key]["answer"] is True
    assert key not in report.checks({**data, "model": "ddddocr OCR"})


def test_report_onnx_minilm_against_hugging_face_path():
    data = {"primary": "cosine", "rows": [
        {"method": "aqm", "setting": "3-bit (--allocate)", "bits_per_weight": 3, "metrics": {"cosine": 0.970}},
        {"method": "aqm", "setting": "3-bit from ONNX (--allocate)", "bits_per_weight": 3,
         "metrics": {"cosine": 0.969}},
        {"method": "aqm+finetune", "setting": "3-bit + distillation (100 steps)", "bits_per_weight": 3,
         "metrics": {"cosine": 0.980}},
        {"method": "aqm+finetune", "setting": "3-bit from ONNX + distillation (100 steps)", "bits_per_weight": 3,
         "metrics": {"cosine": 0.975}}]}
    check = report.checks(data)["ONNX source within 0.002 cosine of the Hugging Face path"]
    assert check["answer"] is False and list(check["differences"].values()) == [-0.001, -0.005]


def test_digits_cnn_is_the_same_model_whatever_the_callers_thread_count():
    """The bench's digits reference model: trained on one thread, so a run that left torch on 2
    threads (or a machine with more cores) trains the same weights, and the caller's count is kept."""
    torch = pytest.importorskip("torch")
    from bench import tasks
    Xtr, ytr, _, _ = tasks.digits_data()
    before = torch.get_num_threads()
    weights = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            m = tasks.train_digits(Xtr[:256], ytr[:256], epochs=2)
            assert torch.get_num_threads() == threads
            weights.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(weights[0], weights[1])


def test_error_attribution_ranks_tensors_and_adds_up_to_the_file(tmp_path):
    """Each coded tensor alone in the fp32 graph, largest KL first; all of them at once is the file
    as aqformat's own session runs it."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    from aqformat.converters import from_onnx
    from bench import tasks
    from bench.error_attribution import attribute
    from bench.onnx_models import aqm_session, session_logits
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 96), torch.nn.ReLU(),
                              torch.nn.Linear(96, 10)).eval()
    path = str(tmp_path / "m.onnx")
    tasks.run_quietly(lambda: torch.onnx.export(net, (torch.zeros(1, 64),), path, dynamo=False, input_names=["x"],
                                                output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}))
    x = np.random.default_rng(1).standard_normal((200, 64)).astype(np.float32)
    ref = session_logits(tasks.ort_session(path), x)
    aqm = str(tmp_path / "m.aqm")
    from_onnx(path, aqm, bits=3, min_elements=64, progress=False)
    got = attribute(path, aqm, x, ref)
    kls = [r["kl"] for r in got["tensors"]]
    assert kls == sorted(kls, reverse=True) and kls[0] > 0
    assert {r["tensor"] for r in got["tensors"]} >= {"0.weight", "2.weight", "4.weight"}
    whole = classifier_metrics(ref, session_logits(aqm_session(aqm), x))
    assert got["whole_file"]["kl"] == pytest.approx(whole["kl"], rel=1e-3, abs=1e-6)
    assert got["whole_file"]["top1_agreement"] == pytest.approx(whole["top1_agreement"])
    assert 0.3 < got["sum_of_single_kl"] / got["whole_file"]["kl"] < 3
