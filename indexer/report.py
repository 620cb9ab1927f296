"""What the jobs print for a person: the build summary and the query answer as text. Formatting
only; the numbers come from the jobs' results."""

from __future__ import annotations


def build_summary(version: str, manifest: dict) -> str:
    inputs, som, clf = manifest["inputs"], manifest["som"], manifest["classifier"]
    history = manifest["backbone"]["history"]
    val_acc = history[-1].get("val_accuracy") if history else None
    lines = [
        "",
        f"Atlas version {version} published",
        f"  images          {inputs['image_files']} files, {inputs['cells']} cells, {inputs['rejected']} rejected",
        f"  classes         {', '.join(f'{k} {v}' for k, v in manifest['counts_by_class'].items())}",
        f"  segmenter       {manifest['segmenter']['name']}, {manifest['segmenter']['ms_per_cell']:.0f} ms per cell",
        f"  duplicates      {manifest['duplicates']['cells_in_duplicate_groups']} cells in "
        f"{manifest['duplicates']['groups_with_duplicates']} groups; "
        f"{manifest['duplicates']['pairs_to_review_total']} pairs at 3 bits to review",
        f"  backbone        {manifest['parameters']['backbone_preset']['name']} preset, {len(history)} epochs, "
        f"val accuracy {val_acc if val_acc is None else f'{val_acc:.3f}'}",
        f"  SOM             {som['rows']}x{som['cols']}, QE {som['quantization_error']:.3f}, "
        f"TE {som['topographic_error']:.3f}",
        f"  classifier      out-of-fold accuracy {clf['out_of_fold_accuracy']:.3f}, " + flag_text(clf),
        *novelty_lines(manifest.get("novelty")),
        "  time            " + ", ".join(f"{k} {v:.0f}s" for k, v in manifest["timings_s"].items()),
        f"  total           {sum(manifest['timings_s'].values()):.0f}s",
    ]
    return "\n".join(lines)


def flag_text(clf: dict) -> str:
    """How many cells the build flagged, and by which rule."""
    calibration = clf.get("calibration")
    if not calibration:
        return f"{clf['share_flagged']:.1%} flagged (entropy > {clf['flag_threshold_bits']:.2f} bits)"
    return (f"{clf['share_flagged']:.1%} flagged (prediction set at {calibration['coverage']:.1%} not one class; "
            f"mean set size {calibration['mean_set_size']:.2f}); temperature {calibration['temperature']:.2f}, "
            f"ECE {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}")


def novelty_lines(novelty: dict | None) -> list[str]:
    if not novelty:
        return []
    return [f"  novelty         {novelty['k']} nearest cells; novel above {novelty['score_at_level']:.3f} "
            f"(p < {novelty['level']:g}; archive median {novelty['median_score']:.3f})"]


def query_text(result, method: str) -> str:
    """A QueryResult (atlas.reference) as a person reads it."""
    p = result.prediction
    lines = [f"atlas version {result.version}, SOM node {result.som_node}",
             f"predicted {p.label}  entropy {p.entropy_bits:.2f} bits" + ("  ** UNCERTAIN **" if p.flagged else "")]
    if p.prediction_set is not None:
        lines.append(f"prediction set at {p.coverage:.0%}: {{{', '.join(p.prediction_set)}}}")
    novelty = getattr(result, "novelty", None)
    if novelty is not None:
        lines.append(f"novelty {novelty.score:.4f} (p = {novelty.p_value:.2g})"
                     + (f"  ** {novelty.message} **" if novelty.novel else ""))
    lines += [f"  {label:<16} {prob:6.3f}" for label, prob in sorted(p.probabilities.items(), key=lambda kv: -kv[1])]
    lines.append(f"reference cells ({method}):")
    lines += [f"  {r.cell_id}  {str(r.label):<16} distance {r.distance:.4f}  node {r.som_node}"
              for r in result.references]
    return "\n".join(lines)


def segment_text(result: dict) -> str:
    head = (f"{result['image']}  {result['width']}x{result['height']}  ({result['segmenter']} at "
            f"{result['um_per_pixel']:g} um/px, {result['ms']:.0f} ms)")
    if not result["cells"]:
        return f"{head}\n  no white cell found"
    lines = [f"{head}  {len(result['cells'])} cell(s)"]
    for cell in result["cells"]:
        r0, c0, r1, c1 = cell["bbox"]
        lines.append(f"  #{cell['index']} {'main' if cell['index'] == 0 else '    '}  rows {r0}-{r1} cols {c0}-{c1}  "
                     f"cell {cell['cell_area_um2']:.1f} um2  nucleus {cell['nucleus_area_um2']:.1f} um2"
                     + ("  (cut by the border)" if cell["touches_border"] else ""))
    if result.get("mask"):
        lines.append(f"  mask of the main cell: {result['mask']}")
    return "\n".join(lines)


def mask_scores(result: dict) -> str:
    def scores(r):
        return (f"cell Dice {fmt(r['mean_cell_dice'])} IoU {fmt(r['mean_cell_iou'])}, nucleus Dice "
                f"{fmt(r['mean_nucleus_dice'])} IoU {fmt(r['mean_nucleus_iou'])}, {r['mean_ms']:.0f} ms/image, "
                f"{r['no_cell_found']} without a cell")

    sets = result["sets"]
    text = f"{result['images']} images: {scores(result)}"
    if len(sets) > 1:
        text += "".join(f"\n    {name} ({s['images']} at {s['um_per_pixel']:g} um/px): {scores(s)}"
                        for name, s in sets.items())
    return text


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def segmenter_training_text(out, config: dict) -> str:
    training = config["training"]
    lines = [f"segmenter saved to {out}",
             "  sets            " + ", ".join(
                 f"{name} {s['um_per_pixel']:g} um/px ({s['train_images']} train, {s['held_out_images']} held out)"
                 for name, s in config["sets"].items()),
             f"  cell diameter   {config['cell_diameter_um']:.1f} um; model scale "
             f"{config['model_um_per_pixel']:.3f} um/px; nucleus from {config['nucleus']}",
             f"  training        {training['epochs']} epochs in {training['seconds']:.0f} s"]
    if "held_out_metrics" in config:
        lines.append("  held out        " + mask_scores(config["held_out_metrics"]))
    return "\n".join(lines)


def box_scores(result: dict) -> str:
    return (f"{result['segmenter']} at {result['um_per_pixel']:g} um/px on {result['images']} images: "
            f"{result['annotated']} {result['label']} boxes, {result['found']} cells found, {result['matched']} "
            f"matched (IoU >= {result['iou_threshold']:g}); recall {fmt(result['recall'])}, precision "
            f"{fmt(result['precision'])}; {result['mean_ms']:.0f} ms per image")


def export_text(result) -> str:
    """An ExportResult (indexer.export) as a person reads it: where each part went."""
    tables = ("cells.parquet, corrections.parquet" if result.format == "parquet"
              else "cells.csv, corrections.csv")
    labels = result.counts_by_label
    lines = [f"atlas version {result.version} exported to {result.out} ({result.format})",
             f"  images/         {sum(labels.values())} crops in {len(labels)} label folders: "
             + ", ".join(f"{label} {n}" for label, n in labels.items())]
    if result.unlabelled:
        lines.append(f"  unlabelled/     {result.unlabelled} crops of cells without a label "
                     "(beside the class tree, not a class of it)")
    lines.append(f"  tables          {tables}: {result.cells} cells, {result.corrections} corrections "
                 f"({result.cells_relabelled} cells relabelled)")
    if result.format == "coco":
        lines.append("  annotations     annotations.json: COCO instances, cell and nucleus masks as RLE")
    return "\n".join(lines)


def add_summary(version: str, manifest: dict) -> str:
    """What `cellatlas add` did: cells added, copies left out, time per step, drift in words."""
    add, drift = manifest["add"], manifest["drift"]
    copies = add["copies_of_archived_cells"]
    lines = [
        "",
        f"Atlas version {version} published (added to {manifest['parent_version']} with its frozen models)",
        f"  images          {add['image_files']} files, {add['cells_found']} cells found, {add['rejected']} rejected",
        f"  added           {add['cells_added']} cells ({len(add['archived_cells_folded'])} archived through the API); "
        f"{add['withdrawn_left_out']} withdrawn cells left out",
        f"  copies          {len(copies)} already archived, not added"
        + "".join(f"\n                    {c['source_path']} = {c['archived_cell_id']} ({c['kind']}"
                  f"{', ' + str(c['bits']) + ' bits' if c['kind'] == 'near' else ''})" for c in copies[:10])
        + (f"\n                    ... and {len(copies) - 10} more (see the manifest)" if len(copies) > 10 else ""),
        f"  classes         {', '.join(f'{k} {v}' for k, v in manifest['counts_by_class'].items())}",
        "  time            " + ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings_s"].items() if k != "total"),
        f"  total           {manifest['timings_s'].get('total', 0):.1f}s, {add['cells_per_s']:.1f} cells/s",
        f"  drift           {drift['message']}",
    ]
    for source, measures in drift["by_source"].items():
        lines.append(f"    {source:<14}{measures['cells']} cells, {measures['share_far']:.0%} far, mean entropy "
                     f"{measures['mean_entropy_bits'] or 0:.2f} bits, {measures['share_flagged']:.0%} flagged")
    return "\n".join(lines)
