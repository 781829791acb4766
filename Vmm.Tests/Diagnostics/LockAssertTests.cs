// The lock preconditions are live in Debug builds: calling a method that expects a lock without it
// fails with VmBugException naming the method and the lock (Diagnostics/LockAssert.cs). Release builds
// compile the checks out, so these tests exist only in Debug.
#if DEBUG
using System.Reflection;
using Vmm.Memory;
using Vmm.Mm;

namespace Vmm.Tests.Diagnostics;

[TestFixture]
[Category("Smoke")]
public sealed class LockAssertTests
{
    private const ulong Page = 4096;

    [Test]
    public void A_page_table_walk_without_the_mmap_lock_fails_naming_the_method_and_the_lock()
    {
        using var machine = TestMachines.Create();
        VmProcess process = machine.CreateProcess();
        Assert.That(process.Mmap(0, Page, Protection.ReadWrite, MapFlags.Private | MapFlags.Populate, out _), Is.EqualTo(Errno.None));
        AddressSpace mm = process.Mm;

        var failure = Assert.Throws<VmBugException>(() => mm.EnumeratePtes());
        Assert.That(failure!.Message, Is.EqualTo("EnumeratePtes requires the mmap_lock held"), "the message names the method and the lock");

        mm.MmapLock.EnterReadLock();
        try
        {
            Assert.That(mm.EnumeratePtes().Count(), Is.EqualTo(1), "with the lock held the walk runs");
        }
        finally
        {
            mm.MmapLock.ExitReadLock();
        }
    }

    [Test]
    public unsafe void Allocating_a_page_table_without_the_mmap_lock_fails()
    {
        using var machine = TestMachines.Create();
        AddressSpace mm = machine.CreateProcess().Mm;
        Assert.Throws<VmBugException>(() => mm.AllocPte(0x10_0000, out _));
    }

    [Test]
    public unsafe void The_pte_lock_records_its_owner_and_only_the_owner_may_release_it()
    {
        using var machine = TestMachines.Create();
        VmProcess process = machine.CreateProcess();
        Assert.That(process.Mmap(0, Page, Protection.ReadWrite, MapFlags.Private | MapFlags.Populate, out ulong va), Is.EqualTo(Errno.None));
        AddressSpace mm = process.Mm;
        Assert.That(mm.FindPte(va, out long ptePfn) != null, Is.True);

        Assert.Throws<VmBugException>(() => mm.UnlockPte(ptePfn), "unlocking a pte lock nobody holds");
        mm.LockPte(ptePfn);
        try
        {
            Assert.That(mm.IsPteLockHeldByCurrentThread(ptePfn), Is.True);
            Assert.Throws<VmBugException>(() => mm.LockPte(ptePfn), "taking it again would spin forever");
            bool heldElsewhere = true;
            Exception? elsewhere = null;
            var other = new Thread(() =>
            {
                heldElsewhere = mm.IsPteLockHeldByCurrentThread(ptePfn);
                elsewhere = Catch(() => mm.UnlockPte(ptePfn));
            });
            other.Start();
            other.Join();
            Assert.That(heldElsewhere, Is.False, "another thread does not own it");
            Assert.That(elsewhere, Is.TypeOf<VmBugException>(), "another thread may not release it");
        }
        finally
        {
            mm.UnlockPte(ptePfn);
        }
    }

    [Test]
    public void The_pcp_lock_records_its_owner_and_only_the_owner_may_release_it()
    {
        var pcp = new PerCpuPages();
        Assert.Throws<VmBugException>(pcp.Exit, "releasing a pcp lock nobody holds");
        pcp.Enter();
        Assert.That(pcp.IsHeldByCurrentThread, Is.True);
        bool heldElsewhere = true;
        var other = new Thread(() => heldElsewhere = pcp.IsHeldByCurrentThread);
        other.Start();
        other.Join();
        Assert.That(heldElsewhere, Is.False);
        var recursive = Assert.Throws<VmBugException>(pcp.Enter, "taking it again would spin forever");
        Assert.That(recursive!.Message, Does.StartWith("EnterContended requires the pcp lock not already held by this thread"));
        pcp.Exit();
        Assert.That(pcp.IsHeldByCurrentThread, Is.False);
    }

    [Test]
    public void A_buddy_list_primitive_without_the_zone_lock_fails()
    {
        using var machine = TestMachines.Create();
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        Zone zone = machine.Allocator.ZoneOf(pfn);
        MethodInfo headLocked = typeof(PageAllocator).GetMethod("FreeListHeadLocked", BindingFlags.Instance | BindingFlags.NonPublic)!;

        var failure = Assert.Throws<TargetInvocationException>(() => headLocked.Invoke(machine.Allocator, [zone, 0, MigrateType.Movable]));
        Assert.That(failure!.InnerException, Is.TypeOf<VmBugException>());
        Assert.That(failure.InnerException!.Message, Is.EqualTo("FreeListHeadLocked requires the zone lock held"));

        lock (zone.Lock)
            headLocked.Invoke(machine.Allocator, [zone, 0, MigrateType.Movable]);
        machine.Allocator.FreePages(pfn);
    }

    [Test]
    public void Freeing_a_frame_that_still_has_a_reference_fails()
    {
        using var machine = TestMachines.Create();
        long pfn = machine.Allocator.AllocPages(0, AllocFlags.Movable);
        Assert.Throws<VmBugException>(() => machine.Allocator.FreeFrozenPages(pfn, 0), "FreeFrozenPages requires refcount 0");
        machine.Allocator.FreePages(pfn);
    }

    [Test]
    public void An_rmap_unmap_without_the_page_lock_fails()
    {
        using var machine = TestMachines.Create();
        VmProcess process = machine.CreateProcess();
        Assert.That(process.Mmap(0, Page, Protection.ReadWrite, MapFlags.Private | MapFlags.Populate, out ulong va), Is.EqualTo(Errno.None));
        AddressSpace mm = process.Mm;
        long pfn;
        mm.MmapLock.EnterReadLock();
        try
        {
            pfn = mm.EnumeratePtes().Single(e => e.Va == va).Pte.Pfn;
        }
        finally
        {
            mm.MmapLock.ExitReadLock();
        }

        var failure = Assert.Throws<VmBugException>(() => machine.Rmap.TryToMigrate(pfn));
        Assert.That(failure!.Message, Is.EqualTo($"TryToMigrate requires the page lock of frame {pfn} held"));
        Assert.That(machine.MemMap.MapCount(pfn), Is.EqualTo(1), "nothing was unmapped");
    }

    [Test]
    public void A_call_that_needs_the_mmap_lock_for_write_is_refused_under_the_read_lock()
    {
        using var machine = TestMachines.Create();
        AddressSpace mm = machine.CreateProcess().Mm;
        mm.MmapLock.EnterReadLock();
        try
        {
            var failure = Assert.Throws<VmBugException>(() => machine.Ksm!.Enter(mm), "ksm_enter needs mmap_write_lock");
            Assert.That(failure!.Message, Is.EqualTo("Enter requires the mmap_lock held for write"));
        }
        finally
        {
            mm.MmapLock.ExitReadLock();
        }
        Assert.That(mm.KsmSlot, Is.Null, "nothing was registered");
    }

    [Test]
    public void KSM_bookkeeping_without_the_ksm_thread_mutex_fails()
    {
        using var machine = TestMachines.Create();
        var failure = Assert.Throws<VmBugException>(() => machine.Ksm!.Audit([], []));
        Assert.That(failure!.Message, Is.EqualTo("Audit requires the ksm_thread_mutex held"));
        Assert.That(machine.Audit(), Is.Empty, "through its public path (which takes the mutex) the audit runs");
    }

    private static Exception? Catch(Action action)
    {
        try
        {
            action();
            return null;
        }
        catch (Exception e)
        {
            return e;
        }
    }
}
#endif
