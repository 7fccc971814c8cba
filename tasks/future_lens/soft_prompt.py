"""Causal Future Lens methods: transplant a hidden state into a prompt and let the model itself read it.

The state h_l of token T (resid layer l) replaces the residual stream of the prompt's last position at the
same layer (hooks.Edit); the model then continues. Offset N>0 is teacher-forced: the model's own greedy
tokens g_0..g_{N-1} follow the transplant position, and the prediction at that position is read.
- fixed prompt: a generic text prompt;
- learned (soft) prompt: P free input vectors per source layer, trained so the lens distribution matches
  the model's own (KL(model || lens), summed over N), the model frozen.
Teacher forcing hands the lens the true tokens T+1..T+N, so at N>0 part of its accuracy comes from those
tokens and not from h (on SmolLM2 the learned prompt at layer 0 scores 0.34 at N=1 forced, 0.15 free);
`future_lens.teacher_forcing: false` scores the lens on its own greedy tokens instead (free running).

Speed: the prompt positions before the transplant position do not depend on the sample, so they are run
once per batch (batch size 1, with gradients for the soft prompt) and their KV cache is repeated over the
batch; each sample then costs 1 + (n_future - 1) positions instead of P + n_future - 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lensflow.tasks.core.devices import loss_scaler
from lensflow.tasks.core.hooks import Edit, trace
from lensflow.tasks.core.models import LM
from lensflow.tasks.future_lens.metrics import Score, score


def prompt_embeddings(lm: LM, text: str, length: int | None = None) -> torch.Tensor:
    """[P, d] input embeddings of a text prompt; `length` trims (keeps the end) or left-pads by repeating the
    first token, giving a soft prompt initialisation of exactly `length` vectors."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"] or [lm.tokenizer.eos_token_id]
    if length is not None:
        ids = ids[-length:]
        ids = [ids[0]] * (length - len(ids)) + ids
    emb = lm.model.get_input_embeddings()
    return emb(torch.tensor(ids, device=lm.device)).detach()


def transplant_logits(lm: LM, prompt: torch.Tensor, layer: int, h: torch.Tensor, forced: torch.Tensor | None = None,
                      use_cache: bool = True) -> torch.Tensor:
    """Logits [B, 1 + F, V] after putting h [B, d] at resid `layer` of the prompt's last position.

    prompt: [P, d] input embeddings (a fixed prompt's token embeddings, or a trainable soft prompt);
    forced: [B, F] token ids appended after the prompt (teacher forcing for offsets 1..F)."""
    b = h.shape[0]
    emb = lm.model.get_input_embeddings()
    prompt = prompt.to(lm.device, lm.dtype)
    tail = prompt[-1:].unsqueeze(0).expand(b, 1, -1)
    x = tail if forced is None or forced.shape[1] == 0 else torch.cat([tail, emb(forced.to(lm.device))], 1)
    head = prompt[:-1]
    h = h.to(lm.device, lm.dtype)
    if not use_cache or head.shape[0] == 0:
        x = torch.cat([head.unsqueeze(0).expand(b, -1, -1), x], 1)
        with trace(lm, edits=[Edit("resid", layer, h, position=head.shape[0])]):
            out = lm.model(inputs_embeds=x, use_cache=False)
        return out.logits[:, head.shape[0]:]
    past = lm.model(inputs_embeds=head.unsqueeze(0), use_cache=True).past_key_values
    past.batch_repeat_interleave(b)
    with trace(lm, edits=[Edit("resid", layer, h, position=0)]):
        out = lm.model(inputs_embeds=x, past_key_values=past, use_cache=True)
    return out.logits


def lens_logprobs(lm: LM, prompt: torch.Tensor, layer: int, h: torch.Tensor, greedy: torch.Tensor,
                  n_future: int) -> torch.Tensor:
    """[B, n_future, V] log-probs; row N is the lens's distribution for the token at offset N."""
    logits = transplant_logits(lm, prompt, layer, h, greedy[:, : n_future - 1])
    return torch.log_softmax(logits.float(), -1)


def teacher_logprobs(lm: LM, final: torch.Tensor) -> torch.Tensor:
    """The model's own distributions at T..T+N from the stored pre-norm final states [B, N, d]."""
    with torch.no_grad():
        return torch.log_softmax(lm.decode(final.to(lm.device, lm.dtype)).float(), -1)


def train_soft_prompt(lm: LM, layer: int, batches, init: torch.Tensor, steps: int, lr: float
                      ) -> tuple[torch.Tensor, list[float]]:
    """Adam (warm-up, cosine decay) on sum_N KL(p_model(. | T+N) || p_lens(. | N)); `batches` yields dicts with
    h [b, d], greedy [b, N], final [b, N, d]. lr is relative to the RMS of the initial prompt (Adam moves each
    coordinate by about lr per step, so embedding scales differing 100x across models need no retuning).
    The prompt is a float32 master copy; through a float16 model the loss is scaled (devices.loss_scaler) so small
    gradients survive the float16 backward pass. Returns the prompt [P, d] and the loss curve."""
    soft = init.detach().clone().float().to(lm.device).requires_grad_(True)
    scaler = loss_scaler(lm.dtype, lm.device)
    opt = torch.optim.Adam([soft], lr=lr * float(init.float().pow(2).mean().sqrt()))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps))) + 0.05)
    losses = []
    for _, mb in zip(range(steps), batches):
        n_future = mb.greedy.shape[1]
        target = teacher_logprobs(lm, mb.final)
        student = lens_logprobs(lm, soft, layer, mb.h, mb.greedy, n_future)
        loss = F.kl_div(student.flatten(0, 1), target.flatten(0, 1).to(student.device), log_target=True,
                        reduction="batchmean") * n_future
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)  # unscales the gradient; skips the step if it overflowed (then the scale drops)
        scaler.update()
        sched.step()
        losses.append(loss.item())
    return soft.detach().float().cpu(), losses


@torch.no_grad()
def free_running_logprobs(lm: LM, prompt: torch.Tensor, layer: int, h: torch.Tensor, n_future: int) -> torch.Tensor:
    """[B, n_future, V]: offset N is predicted after the lens's own greedy tokens for 0..N-1 (no teacher
    forcing: nothing but the transplanted state and the prompt reaches the model)."""
    toks = torch.zeros(h.shape[0], 0, dtype=torch.long, device=lm.device)
    out = []
    for _ in range(n_future):
        logp = torch.log_softmax(transplant_logits(lm, prompt, layer, h, toks)[:, -1].float(), -1)
        out.append(logp)
        toks = torch.cat([toks, logp.argmax(-1, keepdim=True)], 1)
    return torch.stack(out, 1)


@torch.no_grad()
def evaluate_prompt(lm: LM, prompt: torch.Tensor, layer: int, h: torch.Tensor, greedy: torch.Tensor, batch: int,
                    ks: tuple[int, ...], teacher_forcing: bool = True) -> list[Score]:
    """Metrics per offset N (list index) against the model's greedy tokens, in batches; offsets N > 0 see the
    model's greedy tokens (teacher forcing) or, with teacher_forcing=False, the lens's own."""
    n_future = greedy.shape[1]
    fn = (lambda hb, gb: lens_logprobs(lm, prompt, layer, hb, gb, n_future)) if teacher_forcing else \
        (lambda hb, gb: free_running_logprobs(lm, prompt, layer, hb, n_future))
    logp = torch.cat([fn(h[i : i + batch], greedy[i : i + batch]).cpu() for i in range(0, h.shape[0], batch)])
    return [score(logp[:, n], greedy[:, n], ks) for n in range(n_future)]


@torch.no_grad()
def lens_generate(lm: LM, prompt: torch.Tensor, layer: int, h: torch.Tensor, n_future: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding from the lens itself (no ground truth to force): tokens and probabilities [B, n_future].
    Used by the grid, where the input is an arbitrary prompt."""
    toks = torch.zeros(h.shape[0], 0, dtype=torch.long, device=lm.device)
    probs = []
    for _ in range(n_future):
        p = torch.softmax(transplant_logits(lm, prompt, layer, h, toks)[:, -1].float(), -1)
        top = p.max(-1)
        toks = torch.cat([toks, top.indices[:, None]], 1)
        probs.append(top.values)
    return toks.cpu(), torch.stack(probs, 1).cpu()
