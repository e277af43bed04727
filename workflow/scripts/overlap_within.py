from eigenattn.config.settings import SubspaceOverlap
from eigenattn.spectra.overlap import within_model, write_overlap
from eigenattn.storage import logs

log = logs.start(snakemake)
o = SubspaceOverlap.from_params(snakemake.params.p)
arrays, attrs = within_model(snakemake.input.rows, snakemake.input.halves, o.variant, o.k)
write_overlap(snakemake.output[0], arrays, attrs)
log.info("wrote %s", snakemake.output[0])
