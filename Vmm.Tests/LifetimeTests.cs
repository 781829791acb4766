using System.Runtime.CompilerServices;
using System.Buffers;
using Vmm.Mm;

namespace Vmm.Tests;

/// <summary>
/// Lifetime (issue 9, deliverable 1): after Machine.Dispose every object of the machine throws
/// ObjectDisposedException naming the machine, or is a no-op where .NET says so; Dispose waits for the
/// calls in flight; spans of pins never touch unmapped memory. Before the fix most of these ended the
/// test host with an AccessViolationException (the arena was unmapped under them).
/// </summary>
[TestFixture]
[Category("Smoke")]
public sealed class LifetimeTests
{
    private const int Page = 4096;

    private static Machine NewMachine(bool ksm = true) => TestMachines.Create(TestMachines.Small with { EnableKsm = ksm });

    /// <summary>Asserts that <paramref name="call"/> throws ObjectDisposedException naming the machine.</summary>
    private static void AssertMachineDisposed(Action call, string what)
    {
        var e = Assert.Throws<ObjectDisposedException>(call, what);
        Assert.That(e!.ObjectName, Is.EqualTo(nameof(Machine)), $"{what}: the exception names the machine");
    }

    // ---- use after dispose, per type -------------------------------------------------------------

    [Test]
    public void Every_machine_member_throws_ObjectDisposedException_naming_the_machine_after_Dispose()
    {
        var machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        machine.Dispose();
        AssertMachineDisposed(() => _ = machine.Processes, "Processes");
        AssertMachineDisposed(() => machine.FindProcess(p.Pid), "FindProcess");
        AssertMachineDisposed(() => machine.CreateProcess(), "CreateProcess");
        AssertMachineDisposed(() => machine.GetStats(), "GetStats");
        AssertMachineDisposed(() => machine.Audit(), "Audit");
        AssertMachineDisposed(() => machine.GetVmStats(), "GetVmStats");
        AssertMachineDisposed(() => machine.GetPageInfo(0), "GetPageInfo");
        AssertMachineDisposed(() => machine.ReleaseFreeMemory(), "ReleaseFreeMemory");
        AssertMachineDisposed(() => machine.GetMemoryBlock(0), "GetMemoryBlock");
        Assert.That(machine.IsDisposed, Is.True);
        Assert.That(machine.Topology.NodeCount, Is.EqualTo(2), "what the machine was built as stays readable");
    }

    [Test]
    public void Every_process_member_throws_ObjectDisposedException_after_the_machine_is_disposed()
    {
        var machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(4 * Page);
        p.Write<long>(va, 42);
        machine.Dispose();

        var buffer = new byte[16];
        AssertMachineDisposed(() => p.Read<long>(va), "Read<T> (an AccessViolationException before the fix)");
        AssertMachineDisposed(() => p.Write<long>(va, 1), "Write<T>");
        AssertMachineDisposed(() => p.Read(va, buffer), "Read");
        AssertMachineDisposed(() => p.Write(va, buffer), "Write");
        AssertMachineDisposed(() => p.Fill(va, Page, 7), "Fill");
        AssertMachineDisposed(() => p.Pin(va, Page, write: true), "Pin");
        AssertMachineDisposed(() => p.GetPagemap(va), "GetPagemap");
        AssertMachineDisposed(() => p.Fork(), "Fork");
        AssertMachineDisposed(() => p.Mmap(Page), "Mmap");
        AssertMachineDisposed(() => p.Mmap(0, Page, Protection.ReadWrite, MapFlags.Private, out _), "Mmap (errno form)");
        AssertMachineDisposed(() => p.Munmap(va, Page), "Munmap");
        AssertMachineDisposed(() => p.Mprotect(va, Page, Protection.Read), "Mprotect");
        AssertMachineDisposed(() => p.Madvise(va, Page, Advice.DontNeed), "Madvise");
        AssertMachineDisposed(() => p.SetMemoryMerge(true), "SetMemoryMerge");
        AssertMachineDisposed(() => _ = p.IsMemoryMergeEnabled, "IsMemoryMergeEnabled");
        AssertMachineDisposed(() => p.SetDedupeDomain(va, Page, 1), "SetDedupeDomain (range)");
        AssertMachineDisposed(() => p.SetDedupeDomain(1), "SetDedupeDomain (process)");
        AssertMachineDisposed(() => p.GetKsmStats(), "GetKsmStats");
        AssertMachineDisposed(() => _ = p.RssAnonPages, "RssAnonPages");
        AssertMachineDisposed(() => _ = p.RssShmemPages, "RssShmemPages");
        AssertMachineDisposed(() => _ = p.PageTablePages, "PageTablePages");

        Assert.DoesNotThrow(p.Exit, "Exit is Dispose-like: a no-op once the machine is gone");
        Assert.That((p.Pid, p.Machine, p.HomeNode), Is.EqualTo((1, machine, 0)), "identity stays readable");
    }

    [Test]
    public void Every_Ksm_member_throws_ObjectDisposedException_after_the_machine_is_disposed()
    {
        var machine = NewMachine();
        Vmm.Ksm ksm = machine.Ksm!;
        machine.Dispose();
        AssertMachineDisposed(() => ksm.Read("run"), "Read");
        AssertMachineDisposed(() => ksm.Write("run", "1"), "Write");
        AssertMachineDisposed(() => ksm.SetRun(1), "SetRun");
        AssertMachineDisposed(() => ksm.GetKnobs(), "GetKnobs");
        AssertMachineDisposed(() => ksm.GetStats(), "GetStats");
        AssertMachineDisposed(() => ksm.ScanPages(100), "ScanPages");
        AssertMachineDisposed(() => ksm.RunFullScans(1), "RunFullScans");
        AssertMachineDisposed(ksm.WaitForMemoryRelease, "WaitForMemoryRelease");
    }

    [Test]
    public void Stores_and_buffers_throw_ObjectDisposedException_after_the_machine_is_disposed_and_their_Dispose_is_a_no_op()
    {
        var machine = NewMachine();
        var store = new DedupeStore(machine);
        VmmBuffer buffer = store.Create(new byte[3 * Page]);
        machine.Dispose();

        var bytes = new byte[8];
        AssertMachineDisposed(() => store.Allocate(Page), "Allocate");
        AssertMachineDisposed(() => store.Create(bytes), "Create");
        AssertMachineDisposed(() => store.EstimateSavings(), "EstimateSavings");
        AssertMachineDisposed(() => store.GetKsmStats(), "GetKsmStats");
        AssertMachineDisposed(() => _ = store.Buffers, "Buffers");
        AssertMachineDisposed(() => buffer.Read(0, bytes), "buffer Read (an AccessViolationException before the fix)");
        AssertMachineDisposed(() => buffer.Write(0, bytes), "buffer Write");
        AssertMachineDisposed(() => buffer.Write(0, []), "buffer Write of nothing");
        AssertMachineDisposed(() => buffer.ToArray(), "buffer ToArray");
        AssertMachineDisposed(() => buffer.Pin(), "buffer Pin");
        AssertMachineDisposed(() => new DedupeStore(machine).Dispose(), "a new store");

        Assert.DoesNotThrow(buffer.Dispose, "a buffer disposed after its machine");
        Assert.DoesNotThrow(store.Dispose, "a store disposed after its machine");
        Assert.DoesNotThrow(store.Dispose, "and twice");
        Assert.That(buffer.IsDisposed, Is.True);
    }

    [Test]
    public void Pins_refuse_new_spans_after_the_machine_is_disposed_and_their_Dispose_is_a_no_op()
    {
        var machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(2 * Page);
        PinnedMemory pin = p.Pin(va, 2 * Page, write: true);
        ReadOnlySequence<byte> earlier = pin.AsSequence();
        var store = new DedupeStore(machine);
        PinnedBuffer pinnedBuffer = store.Create(new byte[Page]).Pin(writable: true);
        machine.Dispose();

        AssertMachineDisposed(() => pin.GetSpan(0), "GetSpan");
        AssertMachineDisposed(() => pin.GetReadOnlySpan(0), "GetReadOnlySpan");
        AssertMachineDisposed(() => pin.AsSequence(), "AsSequence");
        Assert.Throws<ObjectDisposedException>(() => _ = earlier.First.Span, "a sequence taken before: its segments check the machine too");
        AssertMachineDisposed(() => pinnedBuffer.AsSequence(), "PinnedBuffer.AsSequence");
        AssertMachineDisposed(() => pinnedBuffer.GetSpan(0), "PinnedBuffer.GetSpan");
        AssertMachineDisposed(() => pinnedBuffer.GetReadOnlySpan(0), "PinnedBuffer.GetReadOnlySpan");
        Assert.That(pin.IsDisposed, Is.True, "a pin of a disposed machine reports itself disposed");

        Assert.DoesNotThrow(pin.Dispose, "unpin after the machine: nothing left to unpin");
        Assert.DoesNotThrow(pinnedBuffer.Dispose);
        Assert.DoesNotThrow(store.Dispose);
        Assert.That(machine.Arena.IsReleased, Is.True, "the last pin let the arena go");
    }

    [Test]
    public void A_span_taken_before_the_machine_is_disposed_reads_zeros_instead_of_unmapped_memory_until_its_pin_goes()
    {
        var machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(Page);
        p.Fill(va, Page, 0x5A);
        PinnedMemory pin = p.Pin(va, Page, write: true);
        Span<byte> span = pin.GetSpan(0);
        Assert.That(span[100], Is.EqualTo(0x5A));

        machine.Dispose();
        Assert.That(machine.Arena.IsReleased, Is.False, "a pin still holds the arena's range");
        Assert.That(machine.Arena.PinReferences, Is.EqualTo(1));
        // A host bug, but not a crash: the range stays mapped, its memory already given back.
        span[1] = 7;
        Assert.That(span[1], Is.EqualTo(7), "the stale span still points at mapped memory");
        if (machine.ReturnsMemoryToHost)
            Assert.That(span[100], Is.Zero, "the contents went back to the host");

        pin.Dispose();
        Assert.That(machine.Arena.IsReleased, Is.True, "the last pin unmapped the range");
    }

    [Test]
    public void Dispose_twice_and_in_any_order_is_harmless()
    {
        var machine = NewMachine();
        var store = new DedupeStore(machine);
        VmmBuffer buffer = store.Create(new byte[Page]);
        PinnedBuffer pinnedBuffer = buffer.Pin();
        VmProcess p = machine.CreateProcess();
        PinnedMemory pin = p.Pin(p.Mmap(Page), Page, write: false);

        // Owner before owned: the store before its buffer's pin, the process before its pin.
        store.Dispose();
        p.Exit();
        Assert.That(machine.Audit(), Is.Empty, "pins keep their frames after their owners go");
        pinnedBuffer.Dispose();
        pin.Dispose();
        buffer.Dispose();
        Assert.That(machine.Audit(), Is.Empty);

        machine.Dispose();
        Assert.DoesNotThrow(machine.Dispose, "Dispose twice");
        Assert.DoesNotThrow(store.Dispose);
        Assert.DoesNotThrow(buffer.Dispose);
        Assert.DoesNotThrow(pinnedBuffer.Dispose);
        Assert.DoesNotThrow(pin.Dispose);
        Assert.DoesNotThrow(p.Exit);
    }

    // ---- exited processes ------------------------------------------------------------------------

    [Test]
    public void An_exited_process_refuses_the_throwing_API_with_InvalidOperationException_and_syscalls_keep_their_errno()
    {
        using Machine machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(Page);
        p.Exit();
        var buffer = new byte[8];
        foreach ((string what, Action call) in new (string, Action)[]
        {
            ("Read", () => p.Read(va, buffer)), ("Write", () => p.Write(va, buffer)),
            ("Read<T>", () => p.Read<long>(va)), ("Write<T>", () => p.Write<long>(va, 1)),
            ("Fill", () => p.Fill(va, Page, 1)), ("Pin", () => p.Pin(va, Page, write: false)),
            ("GetPagemap", () => p.GetPagemap(va)), ("Fork", () => p.Fork()),
        })
        {
            var e = Assert.Throws<InvalidOperationException>(call, what);
            Assert.That(e!.Message, Does.Contain($"process {p.Pid} has exited"), what);
        }
        Assert.That(p.Mmap(0, Page, Protection.ReadWrite, MapFlags.Private, out _), Is.EqualTo(Errno.ENOMEM), "a dead mm maps nothing");
        Assert.DoesNotThrow(() => p.Munmap(va, Page), "syscall-shaped calls return their errno");
        Assert.DoesNotThrow(p.Exit, "Exit is idempotent");
    }

    // ---- calls in flight -------------------------------------------------------------------------

    [Test]
    public void Dispose_waits_for_a_call_in_flight_and_the_caller_s_next_call_throws()
    {
        var machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(Page);
        using var inside = new ManualResetEventSlim();
        using var release = new ManualResetEventSlim();
        Exception? after = null;
        var caller = new Thread(() =>
        {
            using (machine.EnterCall()) // what every public call does first
            {
                inside.Set();
                release.Wait();
                p.Write<long>(va, 42); // nested: still inside, so the arena is still there
            }
            try
            {
                p.Write<long>(va, 43);
            }
            catch (Exception e)
            {
                after = e;
            }
        });
        caller.Start();
        inside.Wait();
        var disposing = Task.Run(machine.Dispose);
        Assert.That(disposing.Wait(200), Is.False, "Dispose waits while a thread is inside the machine");
        Assert.That(machine.IsDisposed, Is.True, "but new calls are already refused");
        release.Set();
        Assert.That(disposing.Wait(TimeSpan.FromSeconds(30)), Is.True, "Dispose returns once the call has left");
        caller.Join();
        Assert.That(after, Is.TypeOf<ObjectDisposedException>(), "the caller's next call throws");
    }

    [Test]
    public void An_endless_RunFullScans_stops_with_ObjectDisposedException_when_the_machine_is_disposed()
    {
        var machine = NewMachine();
        Vmm.Ksm ksm = machine.Ksm!;
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(16 * Page);
        p.Fill(va, 16 * Page, 3);
        Assert.That(p.Madvise(va, 16 * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
        Exception? ended = null;
        var scanner = new Thread(() =>
        {
            try
            {
                ksm.RunFullScans(int.MaxValue);
            }
            catch (Exception e)
            {
                ended = e;
            }
        });
        scanner.Start();
        var spin = new SpinWait();
        while (ksm.GetStats().FullScans < 3)
            spin.SpinOnce();
        machine.Dispose(); // returns only once the scanner has left
        Assert.That(scanner.Join(TimeSpan.FromSeconds(30)), Is.True);
        Assert.That(ended, Is.TypeOf<ObjectDisposedException>(), "the run stopped between two scans");
    }

    [Test]
    public void Dispose_from_inside_a_call_of_the_same_machine_throws_instead_of_waiting_for_itself()
    {
        var machine = NewMachine();
        using (machine.EnterCall())
            Assert.Throws<InvalidOperationException>(machine.Dispose);
        Assert.That(machine.IsDisposed, Is.False, "nothing was disposed");
        Assert.That(machine.GetStats().TotalFrames, Is.GreaterThan(0));
        machine.Dispose();
        Assert.That(machine.IsDisposed, Is.True);
    }

    [Test]
    public void A_thread_inside_one_machine_may_call_into_a_second_but_not_a_third()
    {
        using Machine m1 = NewMachine(), m2 = NewMachine(), m3 = NewMachine();
        VmProcess p2 = m2.CreateProcess();
        ulong va = p2.Mmap(Page);
        using (m1.EnterCall())
        {
            p2.Write<int>(va, 5);
            Assert.That(p2.Read<int>(va), Is.EqualTo(5), "a second machine uses the inner marker");
            using (m2.EnterCall())
            {
                Assert.Throws<InvalidOperationException>(() => m3.CreateProcess(), "a third machine at once is refused");
                Assert.That(m1.GetStats().TotalFrames, Is.GreaterThan(0), "both entered machines still work");
            }
        }
        Assert.That(m3.CreateProcess().Pid, Is.EqualTo(1), "after leaving, any machine can be entered");
    }

    [Test]
    public void Dispose_racing_with_threads_inside_the_machine_lets_every_call_finish_or_throw_ObjectDisposedException()
    {
        int rounds = 6 * TestEnvironment.StressScale;
        for (int round = 0; round < rounds; round++)
            DisposeUnderLoad(round);
    }

    private static void DisposeUnderLoad(int round)
    {
        var machine = TestMachines.Create(TestMachines.Small with { PoisonFreedFrames = round % 2 == 1 });
        Vmm.Ksm ksm = machine.Ksm!;
        Assert.That(ksm.Write("sleep_millisecs", "0"), Is.EqualTo(Errno.None));
        Assert.That(ksm.Write("run", "1"), Is.EqualTo(Errno.None), "ksmd runs too: Dispose must stop it first");
        var store = new DedupeStore(machine);
        const int threads = 4;
        const int maxIterations = 20_000;
        var failures = new System.Collections.Concurrent.ConcurrentBag<Exception>();
        using var warmedUp = new CountdownEvent(threads);
        var workers = new Thread[threads];
        for (int t = 0; t < threads; t++)
        {
            int kind = t;
            workers[t] = new Thread(() =>
            {
                bool signalled = false;
                try
                {
                    VmProcess p = machine.CreateProcess();
                    ulong va = p.Mmap(8 * Page);
                    Assert.That(p.Madvise(va, 8 * Page, Advice.Mergeable), Is.EqualTo(Errno.None));
                    VmmBuffer buffer = store.Allocate(4 * Page);
                    var bytes = new byte[Page];
                    for (int i = 0; i < maxIterations; i++)
                    {
                        if (i == 50)
                        {
                            warmedUp.Signal();
                            signalled = true;
                        }
                        ulong at = va + (ulong)(i % 8) * Page;
                        switch ((kind + i) % 6)
                        {
                            case 0:
                                p.Write<long>(at, i);
                                _ = p.Read<long>(at);
                                break;
                            case 1:
                                using (PinnedMemory pin = p.Pin(at, Page, write: true))
                                    pin.GetSpan(0)[8] = (byte)i;
                                break;
                            case 2:
                                if (p.Mmap(0, Page, Protection.ReadWrite, MapFlags.Private, out ulong extra) == Errno.None)
                                    p.Munmap(extra, Page);
                                break;
                            case 3:
                                ksm.ScanPages(64);
                                break;
                            case 4:
                                buffer.Write(i % (3 * Page), bytes.AsSpan(0, 512));
                                buffer.Read(0, bytes);
                                break;
                            default:
                                p.Fill(at, Page, (byte)(i & 1));
                                break;
                        }
                    }
                }
                catch (ObjectDisposedException)
                {
                    // The expected end: the machine went away under the loop.
                }
                catch (Exception e)
                {
                    failures.Add(e);
                }
                finally
                {
                    if (!signalled)
                        warmedUp.Signal();
                }
            }) { IsBackground = true, Name = $"lifetime worker {t}" };
            workers[t].Start();
        }
        warmedUp.Wait();
        machine.Dispose();
        foreach (Thread worker in workers)
            Assert.That(worker.Join(TimeSpan.FromSeconds(60)), Is.True, "every worker ends");
        Assert.That(failures, Is.Empty, $"round {round}: nothing but ObjectDisposedException");
        Assert.That(ksm.HasThread, Is.True, "ksmd had started");
        Assert.DoesNotThrow(store.Dispose);
    }

    [Test]
    public void A_buffer_pin_that_Dispose_overtakes_inside_its_call_does_not_keep_the_arena_mapped()
    {
        // VmmBuffer.Pin holds one machine call around Process.Pin and the PinnedBuffer's sequence, but the call
        // only keeps Dispose from freeing: Dispose may set its flag in between. The PinnedBuffer constructor's
        // AsSequence then threw ObjectDisposedException and the PinnedMemory just made was dropped undisposed,
        // its arena hold left to the finalizer: the disposed machine's range stayed reserved until some GC.
        var machine = NewMachine();
        var store = new DedupeStore(machine);
        VmmBuffer buffer = store.Create(new byte[2 * Page]);
        Task? disposing = null;
        Exception? thrown = null;
        var caller = new Thread(() =>
        {
            using (machine.EnterCall()) // where VmmBuffer.Pin stands once its Enter has passed
            {
                disposing = Task.Run(machine.Dispose);
                var spin = new SpinWait();
                while (!machine.IsDisposed)
                    spin.SpinOnce();
                try
                {
                    _ = new PinnedBuffer(store.Process.Pin(buffer.Address, 2 * Page, write: false), 2 * Page);
                }
                catch (Exception e)
                {
                    thrown = e;
                }
            }
        });
        caller.Start();
        caller.Join();
        Assert.That(disposing!.Wait(TimeSpan.FromSeconds(30)), Is.True, "Dispose returns once the call has left");
        Assert.That(thrown, Is.TypeOf<ObjectDisposedException>(), "the pin is refused: the machine is going");
        Assert.That(machine.Arena.PinReferences, Is.Zero, "the refused pin let go of the arena at once, not at some GC");
        Assert.That(machine.Arena.IsReleased, Is.True, "so the disposed machine's range is unmapped");
    }

    // ---- per-thread slots ------------------------------------------------------------------------

    [Test]
    [NonParallelizable] // takes every slot of the process for a moment
    public void A_thread_refused_a_slot_does_not_free_another_thread_s_slot_when_its_half_built_context_is_finalized()
    {
        // A finalizable object whose constructor throws is still finalized. AccessContext's constructor
        // throws when all slots are taken; its finalizer then released Slot, still 0, so slot 0 (another
        // live thread's call markers and access epoch) read free: Machine.Dispose and the TLB flush would no
        // longer wait for that thread, and the next new thread shared its slot.
        GC.Collect();
        GC.WaitForPendingFinalizers(); // slots of threads that died before this test go back first
        var taken = new List<int>();
        try
        {
            while (true)
            {
                try
                {
                    taken.Add(TlbShootdown.AllocateSlot());
                }
                catch (InvalidOperationException)
                {
                    break; // every slot is in use now
                }
            }
            Exception? refused = null;
            var latecomer = new Thread(() =>
            {
                try
                {
                    _ = AccessContext.Current;
                }
                catch (Exception e)
                {
                    refused = e;
                }
            });
            latecomer.Start();
            latecomer.Join();
            Assert.That(refused, Is.TypeOf<InvalidOperationException>(), "a thread beyond the last slot is refused");
            GC.Collect();
            GC.WaitForPendingFinalizers();
            int? freed = null;
            try
            {
                freed = TlbShootdown.AllocateSlot();
                taken.Add(freed.Value);
            }
            catch (InvalidOperationException)
            {
                // no slot came free: right
            }
            Assert.That(freed, Is.Not.EqualTo(0), "the half-built context's finalizer released slot 0, which it never owned");
        }
        finally
        {
            foreach (int slot in taken)
                TlbShootdown.ReleaseSlot(slot);
        }
    }

    [Test]
    public unsafe void A_span_of_a_pin_never_disposed_stays_readable_after_the_pin_is_collected_and_the_machine_disposed()
    {
        // Two host mistakes at once: a pin dropped without Dispose, and a span of it used after the machine's
        // Dispose. A span does not keep its pin alive; had the collected pin let the arena go, the read below
        // would hit unmapped memory and end the test host.
        var machine = NewMachine();
        VmProcess p = machine.CreateProcess();
        ulong va = p.Mmap(Page);
        p.Write<long>(va, 42);
        long* address = PinAndDrop(p, va);
        Assert.That(*address, Is.EqualTo(42), "the pinned page, through the span's memory");
        GC.Collect();
        GC.WaitForPendingFinalizers();
        machine.Dispose();
        GC.Collect();
        GC.WaitForPendingFinalizers();
        Assert.That(*address, Is.EqualTo(0), "still mapped: the memory went back to the host and reads zero");
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static unsafe long* PinAndDrop(VmProcess p, ulong va)
    {
        PinnedMemory pin = p.Pin(va, Page, write: false);
        fixed (byte* bytes = pin.GetReadOnlySpan(0))
            return (long*)bytes; // the pin becomes garbage here, undisposed
    }
}
