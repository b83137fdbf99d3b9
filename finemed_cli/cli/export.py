"""`finemed export` and `finemed export-lora`."""

from __future__ import annotations

from pathlib import Path

import click

from finemed_cli.gguf.constants import LORA_TYPES, OUTTYPES


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The .gguf file to write.")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="f16", show_default=True,
              help="Tensor type; K-quants are made from an F16 export by llama.cpp's quantizer.")
@click.option("--lora", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="A peft LoRA adapter directory merged into the weights first.")
@click.option("--pre-tokenizer", default=None,
              help="llama.cpp pre-tokenizer name, when the tokenizer's cannot be recognised.")
@click.option("--name", default=None, help="general.name of the file [default: the directory's name].")
@click.option("--ollama", is_flag=True,
              help="Also write an Ollama Modelfile beside the GGUF (med.gguf: med.Modelfile) and print the "
                   "`ollama create` command.")
def export(model_dir: Path, output: Path, outtype: str, lora: Path | None, pre_tokenizer: str | None,
           name: str | None, ollama: bool) -> None:
    """Export MODEL_DIR (an HF directory: config.json, *.safetensors, tokenizer) to one GGUF file.

    Llama (3.x, SmolLM2), Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 and Phi-3 models (the registry in
    export/arch.py); the tokenizer, special tokens and chat template are carried over, so llama.cpp stops at
    the end of each turn. MODEL_DIR may be a hub id
    (org/name): taken from the HF cache, or downloaded when the network allows.

    \b
    finemed export runs/med/final -o med.gguf --outtype q4_k_m
    finemed export runs/med/final --lora runs/med/adapter -o med-merged-f16.gguf
    finemed export runs/med/final -o med.gguf --ollama    # then: ollama create med -f med.Modelfile
    """
    from contextlib import ExitStack

    from finemed_cli.data.output import output_slot
    from finemed_cli.errors import ExportError
    from finemed_cli.export.gguf import export_gguf
    from finemed_cli.export.ollama import modelfile_path, write_modelfile

    if not model_dir.exists():
        from finemed_cli.checkpoints.loading import resolve_model_source

        resolved, source, _ = resolve_model_source(str(model_dir))
        model_dir, name = Path(source), name or resolved.split("/")[-1]  # not the snapshot's commit hash
    with ExitStack() as slots:
        slots.enter_context(output_slot(output, inputs=[model_dir, lora]))
        if ollama:  # claimed before the export, so a bad Modelfile path stops it at once
            slots.enter_context(output_slot(modelfile_path(output), inputs=[model_dir, lora, output],
                                            what="Modelfile"))
        result = export_gguf(model_dir, output, outtype, lora=lora, pre_tokenizer=pre_tokenizer, name=name,
                             progress=True)
        click.echo(f"{result.path}: {outtype}, {result.tensors} tensors, {result.bytes / 1e6:.1f} MB in "
                   f"{result.seconds:.1f} s ({result.mb_per_s:.0f} MB/s)")
        if ollama:
            try:
                made = write_modelfile(result.path, model_name=name)
            except ExportError as e:  # the GGUF is good without it: keep it, say why there is no Modelfile
                click.echo(f"warning: no Ollama Modelfile: {e}", err=True)
            else:
                click.echo(f"{made.path}: Ollama Modelfile ({made.family} template); make the model with:\n"
                           f"  {made.command}")


@click.command("export-lora")
@click.argument("adapter_dir", type=click.Path(path_type=Path, file_okay=False))
@click.option("--base", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="The base model directory the adapter was trained on (its config.json names the tensors).")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="The LoRA .gguf file to write.")
@click.option("--outtype", type=click.Choice(LORA_TYPES), default="f16", show_default=True)
def export_lora(adapter_dir: Path, base: Path, output: Path, outtype: str) -> None:
    """Write a peft LoRA adapter as a llama.cpp LoRA GGUF (use with `llama-cli --lora FILE`)."""
    from finemed_cli.data.output import output_slot
    from finemed_cli.export.gguf import read_config
    from finemed_cli.export.lora_gguf import export_lora_gguf, load_lora

    with output_slot(output, inputs=[adapter_dir, base]):
        lora = load_lora(adapter_dir)
        path = export_lora_gguf(lora, read_config(base), output, outtype, name=adapter_dir.name)
    click.echo(f"{path}: LoRA rank {lora.rank}, alpha {lora.alpha:g}, {len(lora.modules)} modules")
