// DedupeEstimate: the answer of DedupeStore.EstimateSavings, a dry run of what KSM would save.
//
// The counts are per resident page, the unit KSM works in: a page of a buffer that has a frame of its
// own (written at least once, or merged). Never-written pages (and pages only read, which map the
// shared zero page) hold no memory, so merging cannot save anything on them and they are not counted.
// The estimate follows the KSM knobs as they are when it runs:
//   * use_zero_pages off (the default): zero-filled pages are one content among others; they merge into
//     a KSM page of zeros like any other identical set.
//   * use_zero_pages on: every zero-filled page would map the shared zero page, so all of them are
//     savable and none needs a frame of its own.
//   * max_page_sharing: one KSM page takes at most that many mappings, so a set of n identical pages
//     keeps ceil(n / max_page_sharing) copies.
//   * merge_across_nodes off: identical pages on different NUMA nodes stay apart.
namespace Vmm;

/// <summary>
/// What merging the pages of a <see cref="DedupeStore"/> would save, measured without merging
/// (<see cref="DedupeStore.EstimateSavings"/>). Counts are of resident 4 KiB pages: pages that hold a
/// frame (never-written pages hold none and are not counted). <c>Pages = DistinctPages +
/// DuplicatePages</c> unless an identical set exceeds max_page_sharing (it then keeps several copies).
/// </summary>
/// <remarks>Instances are immutable: safe to share between threads.</remarks>
/// <param name="Pages">resident pages of the store's buffers, each mapping counted once (already merged pages too).</param>
/// <param name="ZeroPages">of those, pages whose 4096 bytes are all zero.</param>
/// <param name="DistinctPages">
/// distinct page contents among the resident pages (with merge_across_nodes off, per NUMA node: the same
/// content on two nodes keeps a copy on each, so it counts twice). With use_zero_pages off, all zero-filled pages are
/// one such content (they merge into one KSM page like any identical set); with use_zero_pages on,
/// zero-filled pages are not counted here, because they would need no frame at all (they map the zero page).
/// </param>
/// <param name="DuplicatePages">
/// pages that would map a copy held elsewhere after merging, and so stop needing a frame of their own:
/// for each content shared by n pages, n minus the copies KSM keeps (ceil(n / max_page_sharing)); with
/// use_zero_pages on, every zero-filled page. After KSM has merged everything, this equals pages_sharing
/// (plus ksm_zero_pages with use_zero_pages on) counted over the store's pages.
/// </param>
/// <param name="SavableBytes"><see cref="DuplicatePages"/> x 4096: the frames merging would free, in bytes (KSM's own metadata not deducted).</param>
/// <param name="SavablePercent"><see cref="DuplicatePages"/> as a percentage of <see cref="Pages"/> (0 when there are no pages).</param>
public readonly record struct DedupeEstimate(long Pages, long ZeroPages, long DistinctPages, long DuplicatePages, long SavableBytes, double SavablePercent);
