"""A 2-3 step transformers Trainer run on a tiny converted model with our callback (warm-up 4,
monitoring every step, 2 layers); run directly or under `accelerate launch`.
Usage: train_tiny.py MODEL_DIR OUTPUT_DIR STEPS"""

import json
import os
import sys

import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from diff_transformer.callbacks import attach

model_dir, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
words = json.load(open(os.path.join(model_dir, "tokenizer.json")))["model"]["vocab"]
words = [w for w in words if not w.startswith("<")]
texts = [" ".join(words[(7 * i) % 40:(7 * i) % 40 + 16]) for i in range(16)]


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return len(texts)

    def __getitem__(self, i):
        ids = torch.tensor(tok.encode(texts[i]).ids[:16])
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


torch.manual_seed(0)
F32 = {("dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"): torch.float32}
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, **F32)
args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=2,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
                         ddp_find_unused_parameters=False,
                         ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
trainer = Trainer(model=model, args=args, train_dataset=Data())
attach(trainer, warmup_steps=4, log_every=1, num_monitor_layers=2)
trainer.train()
trainer.save_model(out)
if trainer.is_world_process_zero():
    tok.save(os.path.join(out, "tokenizer.json"))
    json.dump(trainer.state.log_history, open(os.path.join(out, "log_history.json"), "w"))
rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
    f.write(f"{rank} of {world}")
