"""``liedeploy inspect FILE``: what an adapter, base or merged file holds."""

from __future__ import annotations

import json

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show what an adapter, base or merged file holds",
        description="Show what an adapter file (targets, rank, scale, parameters), a base or a merged "
        "safetensors file (tensors, dtypes, metadata) holds.",
        epilog="example: liedeploy inspect rotated.safetensors --json",
    )
    p.add_argument("file", help="a .safetensors file or a sharded *.safetensors.index.json")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args) -> int:
    from liedeploy.files.describe import describe_file

    info = describe_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(render(info))
    return 0


def _table(rows, headers) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(info: dict) -> str:
    out = [f"{info['path']}: {info['kind']} file, {info['size_bytes']:,} bytes on disk"]
    if info["kind"] == "adapter":
        out.append(
            f"name: {info['name']}   expmap: {info['expmap']}   format_version: {info['format_version']}   "
            f"created_by: {info['created_by']}"
        )
        out.append(
            f"targets: {len(info['targets'])}   trainable parameters: {info['num_parameters']:,}   "
            f"factor dtype: {info['factor_dtype']}"
        )
        rows = [
            (t["name"], "x".join(map(str, t["shape"])), t["rank"], f"{t['scale']:g}", f"{t['parameters']:,}")
            for t in info["targets"]
        ]
        out.append(_table(rows, ["target", "shape", "rank", "scale", "params"]))
        if info.get("full"):
            out.append("full tensors (replaced whole, format_version 2):")
            out.append(_table([(t["name"], "x".join(map(str, t["shape"])), t["dtype"], f"{t['parameters']:,}")
                               for t in info["full"]], ["tensor", "shape", "dtype", "params"]))
    else:
        out.append(
            f"tensors: {info['num_tensors']:,}   elements: {info['num_elements']:,}   "
            f"dtypes: {', '.join(f'{k} x{v}' for k, v in sorted(info['dtypes'].items()))}"
            + (f"   shards: {info['shards']}" if info.get("shards") else "")
        )
        if info.get("merged_from"):
            rows = [(m.get("name"), f"{m.get('scale', 1):g}", str(m.get("sha256", ""))[:16]) for m in info["merged_from"]]
            out.append("merged from:")
            out.append(_table(rows, ["adapter", "scale", "sha256"]))
        sp = info.get("sparsity")
        if sp and sp["weights"]:
            out.append(f"sparsity of weights (rank >= 2): {100 * sp['total']:.1f}% zeros in all; "
                       f"2:4 on every weight: {'yes' if sp['all_2:4'] else 'no'}")
            # the sparse weights, and, when some are sparse, every weight that is not 2:4 (the ones that
            # make the summary "no"), so the table always shows why
            pruned = any(w["sparsity"] > 0 for w in sp["weights"].values())
            rows = [(n, f"{100 * w['sparsity']:.1f}%", "yes" if w["2:4"] else "no") for n, w in sorted(sp["weights"].items())
                    if w["sparsity"] > 0 or (pruned and not w["2:4"])]
            if rows:
                out.append(_table(rows, ["weight", "zeros", "2:4"]))
        other = {k: v for k, v in info.get("metadata", {}).items() if k != "liedeploy.merged_from"}
        if other:
            out.append("metadata: " + ", ".join(f"{k}={v[:60]}" for k, v in sorted(other.items())))
    return "\n".join(out)
