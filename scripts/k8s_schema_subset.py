"""Cut a Kubernetes CRD's OpenAPI schema down to what deploy/k8s/*.yaml use, for offline validation.

A CRD schema embeds the whole Pod spec once per pod template (the RayJob one is 1.4 MB of YAML). This keeps,
along every path a manifest uses, the full schema of each object (all its property names, types, patterns,
required fields); a property no manifest uses keeps its type but loses its inner schema and is marked
`"x-posttrain-pruned": true`. tests/unit/test_deploy_manifests.py validates the manifests against the result
(unknown fields rejected, as `kubectl apply` does) and fails when a manifest reaches into a pruned part: then
run this again on the CRD.

    python scripts/k8s_schema_subset.py CRD.yaml deploy/k8s/pytorchjob-sft.yaml --version v1 \\
        --source "kubeflow/training-operator v1.9.0 manifests/base/crds/kubeflow.org_pytorchjobs.yaml" \\
        -o deploy/k8s/schemas/pytorchjob-v1.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

PRUNED = "x-posttrain-pruned"
_KEPT_WHEN_PRUNED = ("type", "format", "anyOf", "pattern", "enum", "x-kubernetes-int-or-string")


def schema_subset(schema: dict, values: list) -> dict:
    """`schema` restricted to the parts that `values` (instances found at this node) reach."""
    out = {k: v for k, v in schema.items() if k not in ("description", "properties", "items", "additionalProperties")}
    nested = "properties" in schema or "items" in schema or isinstance(schema.get("additionalProperties"), dict)
    if not values and nested:
        kept = {k: v for k, v in out.items() if k in _KEPT_WHEN_PRUNED}
        return {**kept, PRUNED: True}
    if "properties" in schema:
        dicts = [v for v in values if isinstance(v, dict)]
        out["properties"] = {
            name: schema_subset(prop, [d[name] for d in dicts if name in d])
            for name, prop in schema["properties"].items()
        }
    if isinstance(schema.get("items"), dict):
        out["items"] = schema_subset(schema["items"], [item for v in values if isinstance(v, list) for item in v])
    if isinstance(schema.get("additionalProperties"), dict):
        map_values = [item for v in values if isinstance(v, dict) for item in v.values()]
        out["additionalProperties"] = schema_subset(schema["additionalProperties"], map_values)
    elif "additionalProperties" in schema:
        out["additionalProperties"] = schema["additionalProperties"]
    return out


def crd_version_schema(crd: dict, version: str) -> dict:
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise SystemExit(f"{crd['metadata']['name']}: no version {version!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="the CustomResourceDefinition YAML")
    parser.add_argument("manifests", type=Path, nargs="+", help="the manifests whose paths are kept")
    parser.add_argument("--version", default="v1")
    parser.add_argument("--source", required=True, help="where the CRD came from (repository, tag, path)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)

    crd = yaml.safe_load(args.crd.read_text())
    kind = crd["spec"]["names"]["kind"]
    docs = [d for m in args.manifests for d in yaml.safe_load_all(m.read_text()) if d and d.get("kind") == kind]
    if not docs:
        print(f"error: no {kind} document in {', '.join(map(str, args.manifests))}", file=sys.stderr)
        return 1
    subset = schema_subset(crd_version_schema(crd, args.version), docs)
    used_by = ", ".join(m.name for m in args.manifests)
    header = {"$comment": f"{kind} {crd['spec']['group']}/{args.version}: the subset of the CRD schema from "
                          f"{args.source}, cut to the paths used by {used_by}; written by scripts/k8s_schema_subset.py"}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({**header, **subset}, indent=1) + "\n")
    print(f"wrote {args.output} ({args.output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
