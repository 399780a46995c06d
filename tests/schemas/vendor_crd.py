"""Turn a CustomResourceDefinition into the JSON Schema that tests/test_k8s.py validates manifests against, offline.

    python tests/schemas/vendor_crd.py CRD.yaml SOURCE > tests/schemas/NAME.json

The CRD's openAPIV3Schema is kept as the API server applies it, with these changes:
- descriptions are dropped (they are most of the CRD's size);
- every object that lists `properties` rejects other fields (`additionalProperties: false`), as kubectl's default
  strict field validation does, unless the CRD marks it `x-kubernetes-preserve-unknown-fields`;
- the top-level `metadata` is Kubernetes' ObjectMeta (from the definitions kubernetes-validate ships), `apiVersion`
  and `kind` are constants;
- int32/int64 formats become ranges; `x-kubernetes-int-or-string` becomes integer-or-string; `nullable` adds null.
CEL rules (`x-kubernetes-validations`) and defaults are kept as data but not evaluated: tests/test_k8s.py checks the
rules the manifests touch by hand.
"""

from __future__ import annotations

import json
import sys

import yaml

OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def convert(node):
    if isinstance(node, list):
        return [convert(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: convert(v) for k, v in node.items() if k != "description"}
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
        out["additionalProperties"] = False
    if node.get("type") == "integer" and node.get("format") in INT_RANGES:
        low, high = INT_RANGES[node["format"]]
        out.setdefault("minimum", low)
        out.setdefault("maximum", high)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def vendor(crd: dict, source: str) -> dict:
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema = convert(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["metadata"] = {"$ref": OBJECT_META}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://qlora-job.invalid/schemas/{group}-{version['name']}-{kind.lower()}.json",
        "description": f"{kind} ({group}/{version['name']}) from {source}, converted by tests/schemas/vendor_crd.py.",
        **schema,
    }


if __name__ == "__main__":
    crd_path, source = sys.argv[1:]
    with open(crd_path, encoding="utf-8") as f:
        (crd,) = [d for d in yaml.safe_load_all(f) if d]
    json.dump(vendor(crd, source), sys.stdout, indent=0, sort_keys=True)
    sys.stdout.write("\n")
