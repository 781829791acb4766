using Vmm.Mm;
using static Vmm.Tests.Ksm.KsmTestKit;
using static Vmm.Tests.TestMachines;

namespace Vmm.Tests.Ksm;

/// <summary>
/// Races and corner cases a review found, each once a failing test: slot teardown mid-scan, changes to
/// a VMA while a merge batch waits in its flush, an abandoned pass, a failed pair, a frame queued twice.
/// </summary>
[TestFixture]
[Category("Smoke")]
[Category("Ksm")]
public sealed class KsmRegressionTests
{
    // Finding: a slot dropped mid-mm (no mergeable VMA left) is freed with the items before the cursor still on it.
    [Test]
    public void A_slot_dropped_mid_scan_takes_all_its_items_with_it()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        VmProcess q = machine.CreateProcess();
        ulong va = MapPattern(p, 100, _ => 0x5A);
        ulong vq = MapPattern(q, 4, i => (byte)(0x10 + i));
        ksm.RunFullScans(2);
        ksm.ScanPages(10);                      // cursor now in the middle of p
        Assert.That(p.Madvise(va, 100 * 4096, Advice.Unmergeable), Is.EqualTo(Errno.None));
        ksm.ScanPages(10);                      // p has no mergeable VMA: slot dropped
        KsmStats s = ksm.GetStats();
        Assert.That(machine.Audit(), Is.Empty);
        // q now writes p's old content: its lookup finds the stale node whose items name p's freed slot
        for (int i = 0; i < 4; i++)
            q.Fill(vq + (ulong)i * 4096, 4096, 0x5A);
        Assert.That(s.RmapItems, Is.EqualTo(4), "only q's items remain");
        Assert.DoesNotThrow(() => ksm.RunFullScans(3));
        Assert.That(machine.Audit(), Is.Empty);
    }

    /// <summary>Holds an access section open on another thread (a reader preempted mid-copy), so a flush waits.</summary>
    private static (Thread, ManualResetEventSlim) HoldSection()
    {
        var entered = new ManualResetEventSlim();
        var release = new ManualResetEventSlim();
        var t = new Thread(() =>
        {
            AccessContext ctx = AccessContext.Current;
            TlbShootdown.Enter(ctx);
            entered.Set();
            release.Wait();
            TlbShootdown.Exit(ctx);
        }) { IsBackground = true };
        t.Start();
        entered.Wait();
        return (t, release);
    }

    /// <summary>
    /// Runs <paramref name="call"/> while the held section keeps ksmd's batch flush waiting, then lets the
    /// flush go. The call may itself flush before it returns (its zap or copy-on-write meets a PTE KSM
    /// write-protected: flush_tlb_batched_pending), and that flush waits for the same held section, so
    /// the call runs on its own thread. Before the section is released, the call must have overlapped
    /// ksmd's flush: its change is visible (<paramref name="changed"/> true), or it is inside its critical
    /// section, holding the mmap lock for write (<paramref name="changed"/> null), where ksmd's next step
    /// on that mm must wait for it and then sees the change.
    /// </summary>
    private static Errno CallDuringFlush(Func<Errno> call, Func<bool?> changed, ManualResetEventSlim release, Thread holder)
    {
        Errno result = Errno.None;
        Exception? failure = null;
        var t = new Thread(() =>
        {
            try { result = call(); }
            catch (Exception e) { failure = e; }
        }) { IsBackground = true };
        t.Start();
        var sw = System.Diagnostics.Stopwatch.StartNew();
        bool? state = changed();
        int busy = 0;
        while (state != true && busy < 100 && t.IsAlive && sw.ElapsedMilliseconds < 5000)
        {
            Thread.Sleep(1);
            state = changed();
            busy = state is null ? busy + 1 : 0;
        }
        bool finishedDuringFlush = !t.IsAlive;
        release.Set();
        t.Join();
        holder.Join();
        if (failure is not null)
            throw new AssertionException($"the call threw: {failure}");
        Assert.That(state, Is.Not.False, "the call changed the range, or was inside its critical section, while ksmd was still in its flush");
        TestContext.Out.WriteLine(finishedDuringFlush ? "the call finished while ksmd was in the flush"
            : $"the call waited for the flush ({(state is null ? "holding the mmap lock" : "its change made")})");
        return result;
    }

    /// <summary>
    /// Whether the VMA of <paramref name="process"/> at <paramref name="va"/> is no longer mergeable (or is
    /// in <paramref name="domain"/>); null while a writer holds the mmap lock.
    /// </summary>
    private static bool? VmaChanged(VmProcess process, ulong va, int domain = -1)
    {
        if (!process.Mm.MmapLock.TryEnterReadLock(0))
            return null;
        try
        {
            Vma? vma = process.Mm.VmaAt(va);
            return vma is not null && (domain < 0 ? (vma.Flags & VmaFlags.Mergeable) == 0 : vma.KsmDomain == domain);
        }
        finally
        {
            process.Mm.MmapLock.ExitReadLock();
        }
    }

    private static Thread StartScan(Vmm.Ksm ksm, int fullScans, Action<Exception>? onError = null)
    {
        var t = new Thread(() => { try { ksm.RunFullScans(fullScans); } catch (Exception e) { onError?.Invoke(e); } }) { IsBackground = true };
        t.Start();
        return t;
    }

    private static void WaitUntil(Func<bool> cond)
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        while (!cond())
        {
            if (sw.ElapsedMilliseconds > 5000) Assert.Fail("timed out");
            Thread.Sleep(1);
        }
    }

    // Finding: the pair's own page is never re-checked (VMA mergeable / domain / PTE) in phase 3.
    [TestCase(false)]
    [TestCase(true)]
    public void An_unmerge_or_domain_change_during_a_batch_flush_wins_over_the_pending_pair(bool domain)
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        VmProcess q = machine.CreateProcess();
        ulong vp = MapPattern(p, 1, _ => 0x77);
        ulong vq = MapPattern(q, 1, _ => 0x77);
        ksm.RunFullScans(1);                       // checksums recorded
        var (holder, release) = HoldSection();
        Thread scan = StartScan(ksm, 1);           // pass 2: q's page pairs with p's (q's page becomes the KSM page)
        WaitUntil(() => !p.GetPagemap(vp).Writable && !q.GetPagemap(vq).Writable); // phase 1 done, ksmd stuck in flush
        Thread.Sleep(50);
        Errno e = CallDuringFlush(() => domain ? q.SetDedupeDomain(vq, 4096, 7) : q.Madvise(vq, 4096, Advice.Unmergeable),
            () => VmaChanged(q, vq, domain ? 7 : -1), release, holder);
        TestContext.Out.WriteLine($"{(domain ? "SetDedupeDomain" : "madvise(UNMERGEABLE)")} on q returned {e}, begun while ksmd was in the flush");
        scan.Join();
        PagemapEntry eq = q.GetPagemap(vq), ep = p.GetPagemap(vp);
        TestContext.Out.WriteLine($"q: ksm={eq.Ksm} pfn={eq.Pfn}; p: ksm={ep.Ksm} pfn={ep.Pfn}; q stats {q.GetKsmStats()}; {ksm.GetStats()}");
        ksm.RunFullScans(2);
        eq = q.GetPagemap(vq); ep = p.GetPagemap(vp);
        TestContext.Out.WriteLine($"after 2 more scans: q: ksm={eq.Ksm} pfn={eq.Pfn}; p: ksm={ep.Ksm} pfn={ep.Pfn}; {ksm.GetStats()}");
        if (!domain)
        {
            Assert.That(ksm.Write("run", "2"), Is.EqualTo(Errno.None));
            TestContext.Out.WriteLine($"after run=2: q ksm={q.GetPagemap(vq).Ksm}; merge_across_nodes=0 -> {ksm.Write("merge_across_nodes", "0")}");
        }
        Assert.That(eq.Ksm && eq.Pfn == ep.Pfn, Is.False, "q's range was unmerged / moved to another domain, yet it shares a KSM page with p");
    }

    // Finding: run=2 that stops on ENOMEM abandons the pass without bumping seqnr; items of later mms
    // stay flagged "filed this pass" and the next pass (same seqnr, buckets cleared) hits VmBugException.
    [Test]
    public void Scanning_after_run_2_failed_with_ENOMEM_finds_the_indexes_consistent()
    {
        using var machine = Create(OneNode with { BlockSizeBytes = 2L << 20 });
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p1 = machine.CreateProcess();
        VmProcess p2 = machine.CreateProcess();
        VmProcess p3 = machine.CreateProcess();
        ulong v1 = MapPattern(p1, 1500, _ => 0x33);                         // merges into one KSM page
        ulong v2 = MapPattern(p2, 8, i => (byte)(0x40 + i));                // unique: filed in the unstable index
        ulong v3 = MapPattern(p3, 200, i => (byte)(0x80 + (i % 60)));       // many pages: the batch stops inside p3
        ksm.RunFullScans(2);
        TestContext.Out.WriteLine("merged: " + ksm.GetStats());
        ksm.ScanPages(1500 + 8 + 20);                                      // a new pass: p1, p2 (filed this pass), part of p3
        TestContext.Out.WriteLine("mid pass: " + ksm.GetStats());
        // Use up the free memory with a process KSM does not know.
        VmProcess hog = machine.CreateProcess();
        ulong hv = hog.Mmap(16L << 20 is var x ? (ulong)x : 0);
        int hogged = 0;
        try { for (; ; hogged++) hog.Write<byte>(hv + (ulong)hogged * 4096, 1); } catch (InsufficientMemoryException) { }
        TestContext.Out.WriteLine($"hog took {hogged} frames");
        Errno e = ksm.Write("run", "2");
        TestContext.Out.WriteLine($"run=2 -> {e}; run now {ksm.Read("run")}; {ksm.GetStats()}");
        Assert.That(e, Is.EqualTo(Errno.ENOMEM));
        hog.Exit();
        Exception? ex = null;
        try { ksm.RunFullScans(1); } catch (Exception ee) { ex = ee; }
        TestContext.Out.WriteLine("scan after run=2 ENOMEM: " + ex);
        Assert.That(ex, Is.Null);
    }

    // Same root cause, Stable join: Replace re-checks VM_MERGEABLE but not the dedupe domain.
    [Test]
    public void A_domain_change_during_a_batch_flush_stops_a_stable_join()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        VmProcess q = machine.CreateProcess();
        ulong vp = MapPattern(p, 3, i => i < 2 ? (byte)0x11 : (byte)0x22);   // X X Y
        ulong vq = MapPattern(q, 2, i => i == 0 ? (byte)0x11 : (byte)0x22);   // X Y
        ksm.RunFullScans(1);
        ksm.ScanPages(3);                                   // p: X X pair -> KSM page K; Y filed
        long k = p.GetPagemap(vp).Pfn;
        Assert.That(p.GetPagemap(vp).Ksm, Is.True);
        var (holder, release) = HoldSection();
        var scan = new Thread(() => ksm.ScanPages(2)) { IsBackground = true };   // q: X joins K (stable), Y pairs with p's Y
        scan.Start();
        WaitUntil(() => !q.GetPagemap(vq).Writable && !q.GetPagemap(vq + 4096).Writable && !p.GetPagemap(vp + 8192).Writable);
        Thread.Sleep(50);
        Errno e = CallDuringFlush(() => q.SetDedupeDomain(vq, 2 * 4096, 7), () => VmaChanged(q, vq, 7), release, holder);
        TestContext.Out.WriteLine($"SetDedupeDomain(q, 7) -> {e}, begun while ksmd was in the flush");
        scan.Join();
        PagemapEntry e0 = q.GetPagemap(vq);
        TestContext.Out.WriteLine($"q page 0: pfn {e0.Pfn} ksm {e0.Ksm}; p's K = {k}");
        Assert.That(e0.Pfn, Is.Not.EqualTo(k), "a domain-7 page maps domain 0's KSM page");
    }

    // Finding: an unstable-index entry keeps the domain it was filed with; GetMergeablePage/Protect/Replace
    // never look at the VMA's current domain, so a page moved to another domain pairs with the old one.
    [Test]
    public void An_unstable_partner_moved_to_another_domain_does_not_pair()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        VmProcess q = machine.CreateProcess();
        ulong vp = MapPattern(p, 1, _ => 0x5C);
        ulong vq = MapPattern(q, 1, _ => 0x5C);
        ksm.RunFullScans(1);
        ksm.ScanPages(1);                                   // pass 2: p's page filed in the unstable index (domain 0)
        Assert.That(p.SetDedupeDomain(vp, 4096, 9), Is.EqualTo(Errno.None));   // p's page now in domain 9
        ksm.ScanPages(1);                                   // q's page (domain 0) meets it
        PagemapEntry ep = p.GetPagemap(vp), eq = q.GetPagemap(vq);
        TestContext.Out.WriteLine($"p (domain 9): pfn {ep.Pfn} ksm {ep.Ksm}; q (domain 0): pfn {eq.Pfn} ksm {eq.Ksm}");
        Assert.That(ep.Ksm && ep.Pfn == eq.Pfn, Is.False, "pages of domains 9 and 0 share one KSM page");
    }

    // Finding: a failed pending pair that had turned a full node into a chain leaves a one-dup chain.
    [Test]
    public void A_failed_pair_leaves_no_chain_behind()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("max_page_sharing", "2"), Is.EqualTo(Errno.None));
        VmProcess p = machine.CreateProcess();
        VmProcess q = machine.CreateProcess();
        MapPattern(p, 2, _ => 0x44);
        ulong vq = MapPattern(q, 2, _ => 0x44);
        using var pin = q.Pin(vq, 4096, write: false);   // q's first page can never merge
        ksm.RunFullScans(2);
        KsmStats s = ksm.GetStats();
        TestContext.Out.WriteLine(s.ToString());
        foreach (var a in machine.Audit()) TestContext.Out.WriteLine("AUDIT: " + a);
        Assert.That((s.StableNodeChains, s.StableNodeDups), Is.EqualTo((0L, 0L)), "Linux: one regular node, no chain");
    }

    // Finding: CmpAndMergePage's early return for a frame already queued in the batch skips
    // RemoveRmapItemFromTree; an item flagged last pass keeps its flag into a second pass -> VmBug.
    [Test]
    public void A_frame_queued_twice_in_a_batch_never_leaves_an_item_flagged_for_two_passes()
    {
        using Machine machine = CreateForKsm();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = MapPattern(p, 3, i => i switch { 0 => (byte)0xB0, 1 => (byte)0xA0, _ => (byte)0xC0 }); // W=B, X=A, Q=C
        ksm.ScanPages(2);                       // pass 1: W, X recorded; cursor still in p
        VmProcess c = p.Fork();                    // child slot goes just behind the cursor: before p
        ksm.RunFullScans(1);                     // finish pass 1 (Q)
        TestContext.Out.WriteLine("order: " + string.Join(",", ksm.ScanOrder().Select(m => m.Id)));
        p.Fill(va, 4096, 0xA0);                  // W := A (volatile in pass 2)
        Exception? ex = null;
        try { ksm.RunFullScans(3); } catch (Exception e) { ex = e; }
        TestContext.Out.WriteLine("exception: " + ex);
        Assert.That(ex, Is.Null);
    }
}
