"""Airflow: one clusmar round per night.

The round number comes from `clusmar status --next-round` (the unfinished round, else the next
one), so a retried task resumes the same round and a run after a completed round starts the
next; `clusmar round` itself does only what is missing and holds the work directory's lock, so
an overlapping run is refused rather than doubled. Set the Airflow Variables `clusmar_config`
(gs:// path of round.yaml) and `clusmar_workdir` (its `workdir`), and run the task where the
`clusmar` command is installed (the SDK image of deploy/container, e.g. with the
KubernetesPodOperator, or a worker with this package installed).
"""
import datetime

from airflow import DAG
from airflow.operators.bash import BashOperator

ROUND_COMMAND = (
    'clusmar round --config "{{ var.value.clusmar_config }}" '
    '--round "$(clusmar status --workdir "{{ var.value.clusmar_workdir }}" --next-round)"'
)

with DAG(
    dag_id="clusmar_round",
    schedule="0 2 * * *",
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 3, "retry_delay": datetime.timedelta(minutes=15)},
) as dag:
    BashOperator(task_id="round", bash_command=ROUND_COMMAND)
