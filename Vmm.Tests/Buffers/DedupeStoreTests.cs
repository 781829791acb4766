using System.Buffers;
using Vmm.Mm;
using Vmm.Native;
using static Vmm.Tests.TestMachines;

namespace Vmm.Tests.Buffers;

/// <summary>
/// The host API for deduplicated buffers: DedupeStore, VmmBuffer, PinnedBuffer and the dry-run
/// estimate, against what KSM then really does, down to the host's RSS.
/// </summary>
[TestFixture]
[Category("Ksm")]
public sealed class DedupeStoreTests
{
    private const int Page = 4096;

    private static byte[] PagePattern(int seed)
    {
        var page = new byte[Page];
        new Random(seed).NextBytes(page);
        return page;
    }

    /// <summary>A buffer of pages whose page i holds PagePattern(seed(i)).</summary>
    private static VmmBuffer CreatePages(DedupeStore store, int pages, Func<int, int> seed)
    {
        VmmBuffer buffer = store.Allocate((long)pages * Page);
        for (int i = 0; i < pages; i++)
            buffer.Write((long)i * Page, PagePattern(seed(i)));
        return buffer;
    }

    private static IEnumerable<PagemapEntry> Pagemaps(VmmBuffer buffer) =>
        Enumerable.Range(0, (int)buffer.PageCount).Select(i => buffer.Store.Process.GetPagemap(buffer.Address + (ulong)i * Page));

    // ============================================================================================
    // Buffers
    // ============================================================================================

    [Test]
    [Category("Smoke")]
    public void A_buffer_reads_back_what_was_written_across_page_boundaries_and_zeros_elsewhere()
    {
        using Machine machine = CreateForKsm();
        using var store = new DedupeStore(machine);
        long length = 3L * Page + 100;
        VmmBuffer buffer = store.Allocate(length);
        Assert.That(buffer.Length, Is.EqualTo(length));
        Assert.That(buffer.PageCount, Is.EqualTo(4));
        Assert.That(buffer.Address % Page, Is.Zero, "a buffer starts on a page");

        byte[] data = new byte[2 * Page + 300];
        new Random(1).NextBytes(data);
        buffer.Write(Page - 250, data); // from the end of page 0, over all of page 1 and 2, into page 3
        var back = new byte[data.Length];
        buffer.Read(Page - 250, back);
        Assert.That(back, Is.EqualTo(data), "the bytes come back across three page boundaries");

        byte[] all = buffer.ToArray();
        Assert.That(all, Has.Length.EqualTo(length));
        Assert.That(all.AsSpan(0, Page - 250).IndexOfAnyExcept((byte)0), Is.EqualTo(-1), "bytes before the write read zero");
        Assert.That(all.AsSpan(Page - 250, data.Length).SequenceEqual(data), Is.True);
        Assert.That(all.AsSpan(Page - 250 + data.Length).IndexOfAnyExcept((byte)0), Is.EqualTo(-1), "bytes after it too");

        buffer.Write(length - 1, [0xEE]);
        Assert.That(buffer.ToArray()[^1], Is.EqualTo(0xEE), "the last byte is writable");

        VmmBuffer created = store.Create(data);
        Assert.That(created.ToArray(), Is.EqualTo(data), "Create copies its contents in");
        Assert.That(store.Buffers, Is.EquivalentTo(new[] { buffer, created }));
        AssertAuditClean(machine);
    }

    [Test]
    [Category("Smoke")]
    public void Ranges_outside_a_buffer_throw_ArgumentOutOfRangeException_and_change_nothing()
    {
        using Machine machine = CreateForKsm();
        using var store = new DedupeStore(machine);
        VmmBuffer buffer = store.Allocate(2 * Page);
        var page = new byte[Page];
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Write(-1, [1]));
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Write(2 * Page + 1, []), "an offset past the end");
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Write(Page + 1, page), "one byte too many");
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Read(-5, page));
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Read(Page + 1, page));
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.Read(long.MaxValue, page));
        Assert.Throws<ArgumentOutOfRangeException>(() => store.Allocate(0));
        Assert.Throws<ArgumentOutOfRangeException>(() => store.Allocate(-1));
        Assert.Throws<ArgumentException>(() => store.Create([]));
        buffer.Write(2 * Page, []); // an empty write at the very end is in range
        Assert.That(store.Process.RssAnonPages, Is.Zero, "nothing was written");
        Assert.That(buffer.ToArray().AsSpan().IndexOfAnyExcept((byte)0), Is.EqualTo(-1));
        AssertAuditClean(machine);
    }

    [Test]
    [Category("Smoke")]
    public void A_store_needs_a_machine_with_KSM()
    {
        using Machine machine = CreateForKsm(ksm: false);
        var e = Assert.Throws<InvalidOperationException>(() => _ = new DedupeStore(machine));
        Assert.That(e!.Message, Does.Contain("KSM"), "the message says what is missing");
        Assert.That(machine.Processes, Is.Empty, "no process is left behind");
    }

    [Test]
    public void A_store_merges_its_process_memory_in_its_domain()
    {
        using Machine machine = CreateForKsm();
        using var store = new DedupeStore(machine, domain: 7, homeNode: 1);
        Assert.That(store.Process.IsMemoryMergeEnabled, Is.True, "PR_SET_MEMORY_MERGE");
        Assert.That(store.Domain, Is.EqualTo(7));
        Assert.That(store.Process.HomeNode, Is.EqualTo(1));
        VmmBuffer buffer = CreatePages(store, 2, _ => 5);
        Assert.That(Pagemaps(buffer).Select(e => e.Node), Has.All.EqualTo(1), "pages come from the home node");
        Assert.That(store.GetKsmStats().Mergeable, Is.True, "every buffer mapping is VM_MERGEABLE");
        AssertAuditClean(machine);
    }

    [Test]
    [Category("Smoke")]
    public void A_disposed_buffer_is_unmapped_and_every_later_use_throws_ObjectDisposedException()
    {
        using Machine machine = CreateForKsm();
        using var store = new DedupeStore(machine);
        VmmBuffer keep = CreatePages(store, 2, i => i);
        VmmBuffer buffer = CreatePages(store, 3, i => 10 + i);
        ulong address = buffer.Address;
        Assert.That(store.Process.RssAnonPages, Is.EqualTo(5));

        buffer.Dispose();
        buffer.Dispose(); // idempotent
        Assert.That(buffer.IsDisposed, Is.True);
        Assert.That(store.Process.RssAnonPages, Is.EqualTo(2), "its frames went back");
        Assert.That(store.Process.GetPagemap(address).Present, Is.False, "its range is unmapped");
        Assert.That(store.Buffers, Is.EqualTo(new[] { keep }));
        Assert.Throws<ObjectDisposedException>(() => buffer.Write(0, [1]));
        Assert.Throws<ObjectDisposedException>(() => buffer.Read(0, new byte[1]));
        Assert.Throws<ObjectDisposedException>(() => buffer.ToArray());
        Assert.Throws<ObjectDisposedException>(() => buffer.Pin());
        Assert.That(keep.ToArray().AsSpan(Page, Page).SequenceEqual(PagePattern(1)), Is.True, "the other buffer is untouched");
        AssertAuditClean(machine);
    }

    [Test]
    [Category("Smoke")]
    public void Disposing_the_store_disposes_every_buffer_and_exits_its_process()
    {
        using Machine machine = CreateForKsm();
        long freeBefore = machine.GetStats().AllFreePages;
        var store = new DedupeStore(machine);
        VmmBuffer a = CreatePages(store, 2, i => i);
        VmmBuffer b = CreatePages(store, 2, i => i);
        VmProcess process = store.Process;
        store.Dispose();
        store.Dispose(); // idempotent
        Assert.That(process.HasExited, Is.True);
        Assert.That(machine.Processes, Is.Empty);
        Assert.That(a.IsDisposed && b.IsDisposed, Is.True);
        Assert.Throws<ObjectDisposedException>(() => a.Read(0, new byte[1]));
        Assert.Throws<ObjectDisposedException>(() => store.Allocate(1));
        Assert.Throws<ObjectDisposedException>(() => store.EstimateSavings());
        Assert.That(store.Buffers, Is.Empty);
        b.Dispose(); // after the store: nothing left to do, and no throw
        AssertAuditClean(machine); // also flushes the deferred references
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(freeBefore), "every frame of the store, page tables too, is free again");
    }

    [Test]
    public void Dispose_waits_for_reads_in_flight_so_a_reader_never_sees_the_next_buffer_at_the_same_address()
    {
        using Machine machine = CreateForKsm();
        using var store = new DedupeStore(machine);
        for (int round = 0; round < 50; round++)
        {
            VmmBuffer old = store.Create(Enumerable.Repeat((byte)0x11, 4 * Page).ToArray());
            ulong address = old.Address;
            int wrongBytes = 0, otherFailures = 0;
            using var started = new ManualResetEventSlim();
            var reader = new Thread(() =>
            {
                var chunk = new byte[4 * Page];
                started.Set();
                while (true)
                {
                    try
                    {
                        old.Read(0, chunk);
                    }
                    catch (ObjectDisposedException)
                    {
                        return;
                    }
                    catch (Exception)
                    {
                        Interlocked.Increment(ref otherFailures);
                        return;
                    }
                    if (chunk.AsSpan().IndexOfAnyExcept((byte)0x11) >= 0)
                        Interlocked.Increment(ref wrongBytes);
                }
            });
            reader.Start();
            started.Wait();
            old.Dispose();
            VmmBuffer next = store.Create(Enumerable.Repeat((byte)0x22, 4 * Page).ToArray());
            reader.Join();
            Assert.That(otherFailures, Is.Zero, "a read racing with Dispose ends in ObjectDisposedException, nothing else");
            Assert.That(wrongBytes, Is.Zero, $"round {round}: the old buffer's reader never saw the new buffer (old 0x{address:x}, new 0x{next.Address:x})");
            next.Dispose();
        }
        AssertAuditClean(machine);
    }

    [Test]
    public void Different_buffers_can_be_written_and_read_from_different_threads_while_ksm_scans()
    {
        using Machine machine = CreateForKsm();
        using var store = new DedupeStore(machine);
        const int threads = 4, pages = 32;
        VmmBuffer[] buffers = [.. Enumerable.Range(0, threads).Select(_ => store.Allocate(pages * Page))];
        using var stop = new CancellationTokenSource();
        var scanner = Task.Run(() =>
        {
            while (!stop.IsCancellationRequested)
                machine.Ksm!.ScanPages(64);
        });
        var failures = new System.Collections.Concurrent.ConcurrentQueue<string>();
        Parallel.For(0, threads, t =>
        {
            var page = new byte[Page];
            var back = new byte[Page];
            for (int iteration = 0; iteration < 200; iteration++)
            {
                int i = iteration % pages;
                // Half the pages hold the same bytes in every buffer, so KSM merges them meanwhile.
                page.AsSpan().Fill((byte)(i % 2 == 0 ? i : t * 64 + iteration % 50));
                buffers[t].Write((long)i * Page, page);
                buffers[t].Read((long)i * Page, back);
                if (!back.AsSpan().SequenceEqual(page))
                    failures.Enqueue($"thread {t} page {i} iteration {iteration}");
            }
        });
        stop.Cancel();
        scanner.Wait();
        Assert.That(failures, Is.Empty, "every thread reads back its own last write, merged or not");
        AssertAuditClean(machine);
    }

    // ============================================================================================
    // Pins: sequence and spans
    // ============================================================================================

    [Test]
    [Category("Smoke")]
    public void The_pinned_sequence_and_page_spans_hold_the_buffer_bytes_until_the_pin_is_disposed()
    {
        using Machine machine = CreateForKsm();
        using var store = new DedupeStore(machine);
        byte[] data = new byte[5 * Page + 123];
        new Random(2).NextBytes(data);
        VmmBuffer buffer = store.Create(data);

        PinnedBuffer pin = buffer.Pin();
        Assert.That(pin.Length, Is.EqualTo(data.Length));
        Assert.That(pin.PageCount, Is.EqualTo(6));
        Assert.That(pin.Writable, Is.False);
        ReadOnlySequence<byte> sequence = pin.AsSequence();
        Assert.That(sequence.Length, Is.EqualTo(data.Length));
        Assert.That(sequence.ToArray(), Is.EqualTo(data), "the sequence is the buffer's bytes in order");
        Assert.That(sequence.Slice(Page - 3, 10).ToArray(), Is.EqualTo(data.AsSpan(Page - 3, 10).ToArray()), "a slice across a page boundary");

        // One segment per run of physically adjacent frames.
        long[] pfns = [.. Pagemaps(buffer).Select(e => e.Pfn)];
        int runs = 1 + Enumerable.Range(1, pfns.Length - 1).Count(i => pfns[i] != pfns[i - 1] + 1);
        int segments = 0;
        foreach (ReadOnlyMemory<byte> _ in sequence)
            segments++;
        Assert.That(segments, Is.EqualTo(runs), $"frames {string.Join(",", pfns)}");

        var joined = new List<byte>();
        for (int i = 0; i < pin.PageCount; i++)
            joined.AddRange(pin.GetReadOnlySpan(i).ToArray());
        Assert.That(joined, Is.EqualTo(data), "the page spans, one after the other, are the buffer");
        Assert.That(pin.GetReadOnlySpan(5).Length, Is.EqualTo(123), "the last span ends with the buffer");
        Assert.Throws<InvalidOperationException>(() => pin.GetSpan(0), "a read-only pin gives no writable span");
        Assert.Throws<ArgumentOutOfRangeException>(() => pin.GetReadOnlySpan(6));
        Assert.That(Pagemaps(buffer).Select(e => e.Pinned), Has.All.EqualTo(1), "every page holds a pin");

        pin.Dispose();
        pin.Dispose(); // idempotent
        Assert.That(pin.IsDisposed, Is.True);
        Assert.That(Pagemaps(buffer).Select(e => e.Pinned), Has.All.Zero, "unpinned");
        Assert.Throws<ObjectDisposedException>(() => pin.AsSequence());
        Assert.Throws<ObjectDisposedException>(() => pin.GetReadOnlySpan(0));
        Assert.Throws<ObjectDisposedException>(() => _ = sequence.First.Span[0], "memory taken from the sequence is dead with the pin");
        AssertAuditClean(machine);
    }

    [Test]
    public void Writes_through_a_writable_pin_are_what_the_buffer_reads()
    {
        using Machine machine = CreateForKsm();
        using var store = new DedupeStore(machine);
        VmmBuffer buffer = store.Allocate(2 * Page + 10); // never written: the pin allocates the pages
        using (PinnedBuffer pin = buffer.Pin(writable: true))
        {
            Assert.That(pin.Writable, Is.True);
            pin.GetSpan(0).Fill(0xAB);
            pin.GetSpan(1)[^1] = 0xCD;
            pin.GetSpan(2).Fill(0xEF);
            Assert.That(pin.GetSpan(2).Length, Is.EqualTo(10));
            Assert.That(pin.AsSequence().Slice(2 * Page - 1, 2).ToArray(), Is.EqualTo(new byte[] { 0xCD, 0xEF }));
        }
        byte[] all = buffer.ToArray();
        Assert.That(all.AsSpan(0, Page).IndexOfAnyExcept((byte)0xAB), Is.EqualTo(-1));
        Assert.That(all[2 * Page - 1], Is.EqualTo(0xCD));
        Assert.That(all.AsSpan(2 * Page).IndexOfAnyExcept((byte)0xEF), Is.EqualTo(-1));
        AssertAuditClean(machine);
    }

    [Test]
    public void A_pin_of_an_unaligned_range_gives_a_sequence_of_exactly_that_range()
    {
        using Machine machine = CreateForKsm();
        using var store = new DedupeStore(machine);
        byte[] data = new byte[3 * Page];
        new Random(3).NextBytes(data);
        VmmBuffer buffer = store.Create(data);
        using PinnedMemory pin = store.Process.Pin(buffer.Address + 100, 2 * Page, write: false);
        Assert.That(pin.AsSequence().ToArray(), Is.EqualTo(data.AsSpan(100, 2 * Page).ToArray()), "PinnedMemory.AsSequence starts and ends inside pages");
        AssertAuditClean(machine);
    }

    [Test]
    public void A_pinned_buffer_is_not_merged_while_pinned_and_merges_after_unpinning()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        using var store = new DedupeStore(machine);
        VmmBuffer a = CreatePages(store, 4, i => 100 + i);
        VmmBuffer b = CreatePages(store, 4, i => 100 + i); // page for page the same as a

        using (PinnedBuffer pin = b.Pin())
        {
            ksm.RunFullScans(2);
            Assert.That(ksm.GetStats().PagesShared, Is.Zero, "a's pages have only b's as partners, and those are pinned");
            Assert.That(Pagemaps(b).Select(e => e.Ksm), Has.All.False);
            Assert.That(pin.AsSequence().ToArray(), Is.EqualTo(a.ToArray()), "the pin still sees the bytes");
        }
        ksm.RunFullScans(2);
        KsmStats stats = ksm.GetStats();
        Assert.That(stats.PagesShared, Is.EqualTo(4), "unpinned, each pair merges");
        Assert.That(stats.PagesSharing, Is.EqualTo(4));
        Assert.That(Pagemaps(b).Select(e => e.Pfn), Is.EqualTo(Pagemaps(a).Select(e => e.Pfn)), "b maps a's frames (or a b's)");
        Assert.That(Pagemaps(b).Select(e => e.Ksm), Has.All.True);
        AssertAuditClean(machine);
    }

    [Test]
    public void Pinning_a_merged_buffer_gives_it_its_own_copy_again()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        using var store = new DedupeStore(machine);
        VmmBuffer a = CreatePages(store, 3, _ => 9);
        ksm.RunFullScans(2);
        Assert.That(Pagemaps(a).Select(e => e.Ksm), Has.All.True);
        using PinnedBuffer pin = a.Pin();
        Assert.That(Pagemaps(a).Select(e => e.Ksm), Has.All.False, "a pin unshares: the pinned frame is the buffer's own");
        Assert.That(Pagemaps(a).Select(e => e.Pinned), Has.All.EqualTo(1));
        Assert.That(pin.AsSequence().ToArray(), Is.EqualTo(Enumerable.Repeat(PagePattern(9), 3).SelectMany(p => p).ToArray()));
        AssertAuditClean(machine);
    }

    // ============================================================================================
    // The estimate
    // ============================================================================================

    /// <summary>
    /// 75 resident pages: contents c0 x 30 (in two buffers), c1, c2, c3 x 10 each, 10 unique pages,
    /// 5 written zero pages, and 6 pages never written (not resident).
    /// </summary>
    private static void FillMixedStore(DedupeStore store)
    {
        CreatePages(store, 40, i => 1000 + i % 4);     // c0..c3, ten pages each
        CreatePages(store, 20, _ => 1000);             // twenty more c0
        CreatePages(store, 10, i => 2000 + i);         // unique
        VmmBuffer zeros = store.Allocate(11L * Page);  // five pages written with zeros, six never written
        for (int i = 0; i < 5; i++)
            zeros.Write((long)i * 2 * Page, new byte[Page]);
    }

    [Test]
    [Category("Smoke")]
    public void The_estimate_predicts_what_merging_then_saves()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        using var store = new DedupeStore(machine);
        FillMixedStore(store);

        DedupeEstimate estimate = store.EstimateSavings();
        TestContext.Out.WriteLine(estimate);
        Assert.That(estimate.Pages, Is.EqualTo(75), "resident pages only: never-written ones cost nothing");
        Assert.That(estimate.ZeroPages, Is.EqualTo(5));
        Assert.That(estimate.DistinctPages, Is.EqualTo(4 + 10 + 1), "c0..c3, the unique pages, and zeros as one content");
        Assert.That(estimate.DuplicatePages, Is.EqualTo(29 + 9 * 3 + 4));
        Assert.That(estimate.SavableBytes, Is.EqualTo(60L * Page));
        Assert.That(estimate.SavablePercent, Is.EqualTo(80.0).Within(1e-9));

        long freeBefore = machine.GetStats().AllFreePages;
        ksm.RunFullScans(2);
        machine.Audit(); // flushes the deferred references of the replaced frames
        KsmStats stats = ksm.GetStats();
        Assert.That(stats.PagesSharing, Is.EqualTo(estimate.DuplicatePages), "pages_sharing: the mappings that stopped needing a frame");
        Assert.That(stats.PagesShared, Is.EqualTo(5), "one KSM page per content with partners: c0..c3 and zeros");
        Assert.That(store.GetKsmStats().MergingPages, Is.EqualTo(stats.PagesShared + stats.PagesSharing));
        Assert.That(machine.GetStats().AllFreePages - freeBefore, Is.EqualTo(estimate.DuplicatePages), "and that many frames are free again");

        DedupeEstimate again = store.EstimateSavings();
        Assert.That(again, Is.EqualTo(estimate), "counted per mapping, the estimate is the same after merging");
        AssertAuditClean(machine);
    }

    [Test]
    public void With_use_zero_pages_the_estimate_counts_every_zero_page_as_savable()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("use_zero_pages", "1"), Is.EqualTo(Errno.None));
        using var store = new DedupeStore(machine);
        FillMixedStore(store);

        DedupeEstimate estimate = store.EstimateSavings();
        Assert.That(estimate.Pages, Is.EqualTo(75));
        Assert.That(estimate.ZeroPages, Is.EqualTo(5));
        Assert.That(estimate.DistinctPages, Is.EqualTo(4 + 10), "zero pages need no frame: they map the zero page");
        Assert.That(estimate.DuplicatePages, Is.EqualTo(29 + 9 * 3 + 5));

        ksm.RunFullScans(2);
        KsmStats stats = ksm.GetStats();
        Assert.That(stats.PagesSharing + stats.KsmZeroPages, Is.EqualTo(estimate.DuplicatePages), "pages_sharing + ksm_zero_pages");
        Assert.That(stats.KsmZeroPages, Is.EqualTo(5));
        AssertAuditClean(machine);
    }

    [TestCase(600)]
    [TestCase(513)]
    [TestCase(257)]
    public void Identical_sets_larger_than_max_page_sharing_keep_several_copies_in_the_estimate_too(int pages)
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        using var store = new DedupeStore(machine);
        CreatePages(store, pages, _ => 77);

        DedupeEstimate estimate = store.EstimateSavings();
        int copies = (pages + 255) / 256;
        Assert.That(estimate.DistinctPages, Is.EqualTo(1));
        Assert.That(estimate.DuplicatePages, Is.EqualTo(pages - copies), "max_page_sharing 256: one KSM copy per 256 mappings");

        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(estimate.DuplicatePages));
        AssertAuditClean(machine);
    }

    [Test]
    public void With_merge_across_nodes_0_the_estimate_keeps_identical_pages_of_two_nodes_apart()
    {
        using var machine = TestMachines.Create(); // 1024 frames a node: the store spills over to node 1
        Vmm.Ksm ksm = machine.Ksm!;
        using var store = new DedupeStore(machine, homeNode: 0);
        VmmBuffer buffer = CreatePages(store, 1100, i => i % 8);
        PagemapEntry[] entries = [.. Pagemaps(buffer)];
        Assert.That(entries.Select(e => e.Node).Distinct().Count(), Is.EqualTo(2), "the pages lie on both nodes");
        long Savable(Func<int, int> group) => entries.Select((e, i) => (Content: i % 8, Group: group(e.Node)))
            .GroupBy(k => k).Sum(g => g.Count() - (g.Count() + 255) / 256);

        DedupeEstimate across = store.EstimateSavings();
        Assert.That(across.DistinctPages, Is.EqualTo(8), "merge_across_nodes 1 (the default): eight contents");
        Assert.That(across.DuplicatePages, Is.EqualTo(Savable(_ => 0)));

        Assert.That(ksm.Write("merge_across_nodes", "0"), Is.EqualTo(Errno.None));
        DedupeEstimate apart = store.EstimateSavings();
        Assert.That(apart.DistinctPages, Is.EqualTo(16), "each content once per node");
        Assert.That(apart.DuplicatePages, Is.EqualTo(Savable(node => node)));
        Assert.That(apart.DuplicatePages, Is.LessThan(across.DuplicatePages));

        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(apart.DuplicatePages), "what KSM merged with merge_across_nodes 0");
        AssertAuditClean(machine);
    }

    [Test]
    [Category("Smoke")]
    public void The_estimate_merges_nothing_and_changes_no_KSM_counter()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        using var store = new DedupeStore(machine);
        FillMixedStore(store);
        ksm.RunFullScans(1); // checksums recorded: the next scan would merge
        KsmStats before = ksm.GetStats();
        ProcessKsmStats processBefore = store.GetKsmStats();
        PagemapEntry[][] mapsBefore = [.. store.Buffers.Select(b => Pagemaps(b).ToArray())];
        long rssBefore = store.Process.RssAnonPages;

        DedupeEstimate estimate = store.EstimateSavings();
        Assert.That(estimate.DuplicatePages, Is.EqualTo(60), "there is something to merge");

        Assert.That(ksm.GetStats(), Is.EqualTo(before), "no KSM counter moved");
        Assert.That(store.GetKsmStats(), Is.EqualTo(processBefore));
        PagemapEntry[][] mapsAfter = [.. store.Buffers.Select(b => Pagemaps(b).ToArray())];
        Assert.That(mapsAfter, Is.EqualTo(mapsBefore), "every page maps the same frame, with the same bits, as before");
        Assert.That(mapsAfter.SelectMany(m => m).Any(e => e.Ksm), Is.False, "no page became a KSM page");
        Assert.That(mapsAfter.SelectMany(m => m).Count(e => e.Present), Is.EqualTo(75), "never-written pages were not faulted in");
        Assert.That(store.Process.RssAnonPages, Is.EqualTo(rssBefore));

        ksm.RunFullScans(1);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(60), "and the next scan merges as if the estimate had not run");
        AssertAuditClean(machine);
    }

    [Test]
    public void The_estimate_confirms_candidates_by_bytes_beyond_the_cached_copies()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        using var store = new DedupeStore(machine);
        // More distinct contents than the estimate keeps copies of: the last ones are confirmed by re-reading.
        int distinct = DedupeStore.MaxCachedCopies + 100;
        CreatePages(store, distinct, i => i);
        CreatePages(store, 200, i => distinct - 1 - i); // duplicates of the contents seen last
        DedupeEstimate estimate = store.EstimateSavings();
        Assert.That(estimate.Pages, Is.EqualTo(distinct + 200));
        Assert.That(estimate.DistinctPages, Is.EqualTo(distinct));
        Assert.That(estimate.DuplicatePages, Is.EqualTo(200));
        ksm.RunFullScans(2);
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(200));
        AssertAuditClean(machine);
    }

    // ============================================================================================
    // Domains
    // ============================================================================================

    [Test]
    public void Stores_in_different_domains_never_merge_with_each_other()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        using var first = new DedupeStore(machine, domain: 1);
        using var second = new DedupeStore(machine, domain: 2);
        using var firstAgain = new DedupeStore(machine, domain: 1);
        VmmBuffer a = CreatePages(first, 3, i => 500 + i);
        VmmBuffer b = CreatePages(second, 3, i => 500 + i);
        VmmBuffer c = CreatePages(firstAgain, 3, i => 500 + i);
        Assert.That(first.EstimateSavings().DuplicatePages, Is.Zero, "within one store nothing repeats");

        ksm.RunFullScans(3);
        KsmStats stats = ksm.GetStats();
        Assert.That(stats.PagesShared, Is.EqualTo(3), "domain 1's two stores merge page for page");
        Assert.That(stats.PagesSharing, Is.EqualTo(3));
        Assert.That(Pagemaps(c).Select(e => e.Pfn), Is.EqualTo(Pagemaps(a).Select(e => e.Pfn)), "the same domain shares frames");
        Assert.That(Pagemaps(b).Select(e => e.Ksm), Has.All.False, "domain 2 merged with nobody");
        Assert.That(Pagemaps(b).Select(e => e.Pfn).Intersect(Pagemaps(a).Select(e => e.Pfn)), Is.Empty);
        Assert.That(second.GetKsmStats().MergingPages, Is.Zero);
        AssertAuditClean(machine);
    }

    // ============================================================================================
    // Real savings
    // ============================================================================================

    private static Machine NewRssMachine()
    {
        if (!OperatingSystem.IsLinux())
            Assert.Ignore("RSS is read from /proc");
        var machine = TestMachines.Create(new MachineOptions { NodeCount = 2, NodeSizeBytes = 256L << 20, BlockSizeBytes = 128L << 20, MinFreeKbytes = 0 });
        if (!machine.Arena.ReturnsMemoryToHost)
        {
            machine.Dispose();
            Assert.Ignore("the portable arena cannot give memory back to the host");
        }
        return machine;
    }

    [Test]
    public void Merging_three_copies_of_32_MiB_gives_the_two_spare_copies_back_to_the_host()
    {
        using Machine machine = NewRssMachine();
        Vmm.Ksm ksm = machine.Ksm!;
        using var store = new DedupeStore(machine);
        const long size = 32L << 20;
        const int pages = (int)(size / Page);
        VmmBuffer[] copies = [.. Enumerable.Range(0, 3).Select(_ => CreatePages(store, pages, i => i))];
        DedupeEstimate estimate = store.EstimateSavings();
        Assert.That(estimate.SavableBytes, Is.EqualTo(2 * size), "two of the three copies are savable");

        long before = HostMemory.ReadRssBytes();
        ksm.RunFullScans(2);
        ksm.WaitForMemoryRelease(); // the release runs in the background after the scan
        long after = HostMemory.ReadRssBytes();
        TestContext.Out.WriteLine($"RSS {before >> 20} MiB -> {after >> 20} MiB; {ksm.GetStats()}");
        Assert.That(ksm.GetStats().PagesSharing, Is.EqualTo(estimate.DuplicatePages), "everything the estimate promised merged");
        // At least half of the 64 MiB merging freed: the rest of the process (GC, KSM's items) may grow meanwhile.
        Assert.That(before - after, Is.GreaterThan(size), $"RSS {before} -> {after}: the freed frames went back to the host");
        Assert.That(copies[2].ToArray().AsSpan(1234 * Page, Page).SequenceEqual(PagePattern(1234)), Is.True, "and the buffers read the same");
        AssertAuditClean(machine);
    }

    [Test]
    public void Merging_64_MiB_of_identical_pages_lowers_the_host_RSS()
    {
        using Machine machine = NewRssMachine();
        Vmm.Ksm ksm = machine.Ksm!;
        using var store = new DedupeStore(machine);
        const long size = 64L << 20;
        const int pages = (int)(size / Page);
        VmmBuffer buffer = CreatePages(store, pages, _ => 42);
        DedupeEstimate estimate = store.EstimateSavings();
        Assert.That(estimate.DuplicatePages, Is.EqualTo(pages - pages / 256));

        long before = HostMemory.ReadRssBytes();
        ksm.RunFullScans(2);
        ksm.WaitForMemoryRelease(); // the release runs in the background after the scan
        long after = HostMemory.ReadRssBytes();
        KsmStats stats = ksm.GetStats();
        TestContext.Out.WriteLine($"RSS {before >> 20} MiB -> {after >> 20} MiB; {stats}");
        Assert.That(stats.PagesSharing, Is.EqualTo(estimate.DuplicatePages), "everything the estimate promised merged");
        Assert.That(before - after, Is.GreaterThan(size / 2), $"RSS {before} -> {after}: the merged frames went back to the host");
        Assert.That(buffer.ToArray().AsSpan(12345 * Page, Page).SequenceEqual(PagePattern(42)), Is.True, "and the buffer still reads the same");
        AssertAuditClean(machine);
    }

    /// <summary>
    /// Found by the API fuzzer: the estimate asked for the pagemap entry of every page, so a 1 TiB buffer
    /// (2^28 pages, a few written) took 26 s. It now skips missing page tables whole.
    /// </summary>
    [Test]
    public void The_estimate_of_a_huge_sparse_buffer_costs_what_it_holds_not_its_length()
    {
        using Machine machine = CreateForKsm();
        using var store = new DedupeStore(machine);
        VmmBuffer huge = store.Allocate(1L << 40);
        huge.Write(0, PagePattern(7));
        huge.Write((1L << 39) + 5 * Page, PagePattern(7));
        huge.Write((1L << 40) - Page, PagePattern(8));
        var watch = System.Diagnostics.Stopwatch.StartNew();
        DedupeEstimate estimate = store.EstimateSavings();
        Assert.That((estimate.Pages, estimate.DistinctPages, estimate.DuplicatePages), Is.EqualTo((3L, 2L, 1L)), "the three written pages, two contents");
        Assert.That(watch.Elapsed, Is.LessThan(TimeSpan.FromSeconds(3)), "a walk of what the page tables hold (26 s when it asked for each of 2^28 pages)");
    }
}
