"""The built-in exporters, registered under the names the CLI looks up.

| name         | CLI                           | writes                                                  |
|--------------|-------------------------------|---------------------------------------------------------|
| ``onnx``       | ``--onnx``                      | one merged graph, checked in ONNX Runtime               |
| ``onnx-bank``  | ``--onnx --bank A [B ...]``     | a switchable bank graph + one ``.onnx_adapter`` per task  |
| ``onnx-tasks`` | ``--onnx --task-models A ...``  | ``base.onnx`` + ``<task>.onnx`` sharing weights on disk   |
| ``onnx-refit`` | ``--onnx --for-trt``            | a refit-ready graph + its weight-name manifest          |
| ``trt``        | ``--trt``                       | a refittable TensorRT engine (+ the refit-ready graph)  |
"""

from __future__ import annotations

import os

from liedeploy.errors import ConfigError

from liedeploy.exporters.registry import ExportReport, ExportRequest, Exporter, register_exporter

__all__ = ["OnnxExporter", "BankGraphExporter", "TaskModelsExporter", "RefitOnnxExporter", "TensorRTExporter"]


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
                              calibration=req.options.get("calibration"), **_common(req))
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
