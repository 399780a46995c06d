"""qlora-job: fine-tune an LLM with 4-bit QLoRA as a repeatable batch job. Entry point: `python -m job`."""
