"""Fine-tuning jobs on OpenAI, or on the same API served locally (``python -m serve.finetune_api``).

    tunekit jobs create --config configs/banking77/openai.yaml
    tunekit jobs follow ftjob-abc123
    tunekit jobs results ftjob-abc123          # result CSV + loss/accuracy plot
    tunekit jobs list | status JOB | cancel JOB | checkpoints JOB
    tunekit jobs migrate --dry-run              # OpenAI's jobs -> the local API (OpenAI ends them 6 Jan 2027)
    tunekit jobs create --config configs/banking77/openai.yaml --backend local \\
        --base-url http://127.0.0.1:8100/v1

(``python -m train.jobs ...`` is the same command.)

``create`` checks the files with data_prep's rules, prints the cost estimate (billed tokens x epochs
x price from tunekit/prices.yaml), uploads train and valid files (a file already uploaded with the
same content is reused), creates the job and records it in ``runs/openai_jobs/<job id>.json``.
``follow`` prints events and metrics until the job ends (Ctrl-C detaches; ``follow`` again picks up
where it left off) and records the fine-tuned model id in runs/registry.json, where the serving
client's ``finetuned`` alias finds it.

Keys: OPENAI_API_KEY for ``--backend openai``, TUNEKIT_API_KEY for ``--backend local``, from the
environment or a ``.env`` file in the working directory. Transient failures (429, 5xx, timeouts,
dropped connections) are retried with backoff.
"""
