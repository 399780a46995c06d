"""A stand-in for Unsloth in the CPU test of bench/unsloth_peer.py (tests/test_bench.py): its two entry points over
transformers + PEFT, so that everything around them (data, timing, results, the separate process and PYTHONPATH) runs
where Unsloth can't (it needs a GPU). Never on a path outside the tests."""

__version__ = "stand-in"


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name, max_seq_length, load_in_4bit, dtype, local_files_only):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        return AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype), AutoTokenizer.from_pretrained(model_name)

    @staticmethod
    def get_peft_model(model, r, lora_alpha, lora_dropout, bias, target_modules, use_gradient_checkpointing, random_state):
        from peft import LoraConfig, get_peft_model

        if use_gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                                                target_modules=target_modules, task_type="CAUSAL_LM"))
