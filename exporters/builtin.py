"""The built-in exporters, registered under the names the CLI looks up.

| name         | CLI                           | writes                                                  |
|--------------|-------------------------------|---------------------------------------------------------|
| ``onnx``       | ``--onnx``                      | one merged graph, checked in ONNX Runtime               |
| ``onnx-bank``  | ``--onnx --bank A [B ...]``     | a switchable bank graph + one ``.onnx_adapter`` per task  |
| ``onnx-tasks`` | ``--onnx --task-models A ...``  | ``base.onnx`` + ``<task>.onnx`` sharing weights on disk   |
| ``onnx-refit`` | ``--onnx --for-trt``            | a refit-ready graph + its weight-name manifest          |
| ``trt``        | ``--trt``                       | a refittable TensorRT engine (+ the refit-ready graph)  |
| ``onnx-generate`` | ``--onnx --hf-model DIR [--adapter A]`` | a decoder with KV cache (onnxruntime-genai), checked by greedy generation |
"""

from __future__ import annotations

import os

from liedeploy.errors import ConfigError

from liedeploy.exporters.registry import ExportReport, ExportRequest, Exporter, register_exporter

__all__ = ["OnnxExporter", "BankGraphExporter", "TaskModelsExporter", "RefitOnnxExporter", "TensorRTExporter",
           "GenerateExporter"]


def _common(req: ExportRequest) -> dict:
    return dict(opset=req.opset, dynamic_batch=req.dynamic_batch, atol=req.atol, rtol=req.rtol)


def _worst(details: dict) -> float:
    return ExportReport("", "", True, [], details).max_abs_error


def _tasks_summary(req: ExportRequest, where: str) -> str:
    return (f"{req.out}: exported and checked in ONNX Runtime, base and {len(req.adapters)} task(s); "
            f"files in {where}")


@register_exporter
class OnnxExporter(Exporter):
    name = "onnx"
    help = "one merged ONNX graph, checked in ONNX Runtime"

    def export(self, req: ExportRequest) -> ExportReport:
        from liedeploy.exporters.onnx import export_onnx

        details = export_onnx(req.model, req.example_inputs, req.out, fp16=req.fp16, quantize=req.options.get("quantize"),
                              calibration=req.options.get("calibration"), input_names=req.options.get("input_names"),
                              dynamic_axes=req.options.get("dynamic_axes"), by_name=bool(req.options.get("by_name")),
                              **_common(req))
        summary = (f"{req.out}: exported and checked in ONNX Runtime (max abs error "
                   f"{_worst(details):.3g}); report in {req.out}.report.json")
        return ExportReport(self.name, req.out, bool(details["ok"]), [req.out, req.out + ".report.json"], details, summary)


@register_exporter
class BankGraphExporter(Exporter):
    name = "onnx-bank"
    help = "a switchable bank graph plus one .onnx_adapter per task (ONNX Runtime >= 1.20)"
    takes_adapters = True
    supports_fp16 = False

    def export(self, req: ExportRequest) -> ExportReport:
        from liedeploy.exporters.bank_graph import export_bank_graph

        details = export_bank_graph(req.model, req.example_inputs, req.out, list(req.adapters), **_common(req))
        folder = os.path.dirname(os.path.abspath(req.out))
        return ExportReport(self.name, req.out, bool(details["ok"]), [req.out, req.out + ".bank.json", folder], details,
                            _tasks_summary(req, folder))


@register_exporter
class TaskModelsExporter(Exporter):
    name = "onnx-tasks"
    help = "base.onnx plus one merged <task>.onnx per adapter, sharing unchanged weights on disk"
    takes_adapters = True
    supports_fp16 = False
    out_is_folder = True

    def check(self, req: ExportRequest) -> None:
        super().check(req)
        if os.path.exists(req.out) and not os.path.isdir(req.out):
            raise ConfigError(f"--task-models writes a folder, and {req.out} is a file")

    def export(self, req: ExportRequest) -> ExportReport:
        from liedeploy.exporters.task_models import export_task_models

        details = export_task_models(req.model, req.example_inputs, req.out, list(req.adapters),
                                     quantize=req.options.get("quantize"), calibration=req.options.get("calibration"),
                                     **_common(req))
        files = sorted(os.path.join(req.out, f) for f in os.listdir(req.out) if f.endswith(".onnx"))
        return ExportReport(self.name, req.out, bool(details["ok"]), files, details, _tasks_summary(req, req.out))


@register_exporter
class RefitOnnxExporter(Exporter):
    name = "onnx-refit"
    help = "a refit-ready ONNX graph (initializers named as in state_dict) and its refit manifest"

    def check(self, req: ExportRequest) -> None:
        super().check(req)
        if req.options.get("strip"):
            raise ConfigError("--strip applies to --trt engines, not to --onnx --for-trt")

    def export(self, req: ExportRequest) -> ExportReport:
        from liedeploy.exporters.tensorrt import export_refit_onnx

        details = export_refit_onnx(req.model, req.example_inputs, req.out, fp16=req.fp16,
                                    refit_adapters=req.options.get("refit_adapters", ()), **_common(req))
        return ExportReport(self.name, req.out, bool(details["ok"]), [req.out, details["refit_manifest"]], details,
                            f"{req.out}: exported; refit manifest in {details['refit_manifest']}")


@register_exporter
class TensorRTExporter(Exporter):
    name = "trt"
    help = "a refittable TensorRT engine (needs tensorrt and CUDA)"

    def check(self, req: ExportRequest) -> None:
        super().check(req)
        if req.atol is not None or req.rtol is not None:
            raise ConfigError("--atol/--rtol set the ONNX Runtime check; --trt builds from the checked --onnx --for-trt graph")

    def export(self, req: ExportRequest) -> ExportReport:
        from liedeploy.exporters.tensorrt import export_tensorrt

        details = export_tensorrt(req.model, req.example_inputs, req.out, opset=req.opset,
                                  dynamic_batch=req.dynamic_batch, fp16=req.fp16, strip=bool(req.options.get("strip")),
                                  refit_adapters=req.options.get("refit_adapters", ()),
                                  max_batch=req.options.get("max_batch"), opt_batch=req.options.get("opt_batch"))
        return ExportReport(self.name, req.out, bool(details.get("ok", True)), [req.out, details.get("refit_manifest")],
                            details, f"{req.out}: exported; refit manifest in {details.get('refit_manifest')}")

    def prepare(self, req: ExportRequest) -> None:
        from liedeploy.exporters.tensorrt import require_tensorrt

        require_tensorrt()  # refuse before building anything when TensorRT or CUDA is missing
        super().prepare(req)


@register_exporter
class GenerateExporter(Exporter):
    name = "onnx-generate"
    help = "a decoder with KV cache that generates (onnxruntime-genai's model builder), checked by greedy generation"
    supports_fp16 = False
    out_is_folder = True
    builds_model = False  # the exporter reads the transformers folder itself

    def check(self, req: ExportRequest) -> None:
        super().check(req)
        if not req.options.get("hf_model"):
            raise ConfigError("the generation export needs --hf-model DIR")
        for flag, bad in (("--dynamic-batch", req.dynamic_batch), ("--atol/--rtol", req.atol is not None or
                                                                    req.rtol is not None),
                          ("--quantize", req.options.get("quantize"))):
            if bad:
                raise ConfigError(f"{flag} does not apply to the generation export (batch and sequence are always "
                                  "dynamic; it is checked by greedy tokens)")
        if os.path.exists(req.out) and not os.path.isdir(req.out):
            raise ConfigError(f"the generation export writes a folder, and {req.out} is a file")

    def prepare(self, req: ExportRequest) -> None:
        from liedeploy.errors import require

        require("onnxruntime_genai", "genai", "export --onnx --hf-model (a decoder that generates)")
        super().prepare(req)

    def export(self, req: ExportRequest) -> ExportReport:
        from liedeploy.exporters.genai import export_generator

        details = export_generator(req.options["hf_model"], req.options.get("adapter"), req.out,
                                   check_tokens=int(req.options.get("check_tokens") or 32))
        files = [os.path.join(req.out, f) for f in details.get("files", [])]
        n = details["greedy_tokens"]
        summary = (f"{req.out}: decoder with KV cache exported; greedy generation of {n} tokens equals torch on "
                   f"{len(details['checks'])} prompts; run it with onnxruntime_genai.Model({req.out!r})")
        return ExportReport(self.name, req.out, bool(details["ok"]), files, details, summary)
