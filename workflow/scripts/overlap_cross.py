from eigenattn.config.settings import SubspaceOverlap
from eigenattn.spectra.overlap import cross_model, write_overlap
from eigenattn.storage import logs

log = logs.start(snakemake)
o = SubspaceOverlap.from_params(snakemake.params.p)
i = snakemake.input
arrays, attrs = cross_model(i.a, i.a_halves, i.b, i.b_halves, o.variant, o.k)
write_overlap(snakemake.output[0], arrays, attrs)
log.info("wrote %s", snakemake.output[0])
