"""Fills the S3-compatible store of docker/compose.yaml for a trial run of docker/minio.env: the bucket, a tiny
random-weight Llama with its tokenizer (the demo's, so CPU is enough and nothing comes from the Hub) and the
job's built-in SFT and DPO data. It runs in the image; endpoint and credentials are the usual AWS_* variables.

    python seed.py s3://qlora
"""

import sys
import tempfile
from importlib import resources
from pathlib import Path

import boto3
from botocore.exceptions import ClientError

from job.demo import build_tiny_model, demo_texts


def seed(bucket: str) -> None:
    s3 = boto3.client("s3")
    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    data = Path(str(resources.files("job") / "demo_data"))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model", demo_texts(data))
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket, f"models/tiny/{path.relative_to(model).as_posix()}")
    s3.upload_file(str(data / "sft.jsonl"), bucket, "data/sft/train.jsonl")
    s3.upload_file(str(data / "dpo.csv"), bucket, "data/preferences.csv")
    print(f"seeded s3://{bucket}/: models/tiny/, data/sft/train.jsonl, data/preferences.csv")


if __name__ == "__main__":
    seed(sys.argv[1].removeprefix("s3://").strip("/"))
