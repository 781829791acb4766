using Vmm.Mm;
using Vmm.Tests.Robustness;

namespace Vmm.Tests.Mm;

/// <summary>
/// Processes against a shadow model: random mmap, munmap, mprotect, madvise, write, read, fork and exit
/// on several processes, with a shadow copy of every process's memory as the oracle and Audit after
/// every step (the oracle is Robustness/ShadowMemory.cs, shared with the API fuzzer). The actions and
/// their shares of the draws are one table (<see cref="Actions"/>). VMM_STRESS_SCALE=N runs N times more steps.
/// </summary>
[TestFixture]
[Category("Stress")] // the random model runs for about 20 s (more with VMM_STRESS_SCALE): too long for Smoke
public sealed class ProcessModelTests
{
    private const ulong Page = 4096;
    private const ulong Window = 0x4000_0000; // fixed mappings land in [Window, Window + 512 pages)

    /// <summary>
    /// The steps the model takes, in the order they are tried. Each step draws a number in [0, 100) and
    /// takes the first action whose band (its Percent, stacked in this order) the number falls below and
    /// that can run now: an action that cannot (munmap with nothing mapped) lets the draw fall to the
    /// next one, and a draw no action takes is skipped. The last band ends at 100.
    /// </summary>
    private static readonly ModelAction[] Actions =
    [
        new("mmap", Percent: 10, CanRun: s => s.Shadow.Pages.Count < 400, Mmap),
        new("munmap", Percent: 8, CanRun: HasPages, Munmap),
        new("mprotect", Percent: 6, CanRun: HasPages, Mprotect),
        new("madvise(DONTNEED)", Percent: 3, CanRun: HasPages, DontNeed),
        new("write", Percent: 38, CanRun: HasPages, Write),
        new("read", Percent: 25, CanRun: HasPages, Read),
        new("fork", Percent: 5, CanRun: s => s.Processes.Count < 6, Fork),
        new("exit", Percent: 5, CanRun: s => s.Processes.Count > 1, Exit),
    ];

    [TestCase(11)]
    [TestCase(12)]
    public void Random_process_operations_match_the_shadow_and_Audit_stays_clean(int seed)
    {
        Assert.That(Actions.Sum(a => a.Percent), Is.EqualTo(100), "the bands cover every draw");
        var random = new Random(TestEnvironment.Seed(seed));
        using var machine = TestMachines.Create(TestMachines.TwoNodes with { PoisonFreedFrames = seed % 2 == 0 });
        var procs = new List<ShadowProcess>();
        for (int i = 0; i < 3; i++)
            procs.Add(new ShadowProcess { Process = machine.CreateProcess(homeNode: i % 2) });
        long initialFree = machine.GetStats().AllFreePages;
        int steps = 10_000 * TestEnvironment.StressScale;
        var ran = Actions.ToDictionary(a => a.Name, _ => 0);

        for (int step = 0; step < steps; step++)
        {
            ShadowProcess sp = procs[random.Next(procs.Count)];
            var current = new ModelStep(random, step, procs, sp);
            ModelAction? action = Choose(random.Next(100), current);
            if (action is null)
                continue;
            ran[action.Name]++;
            action.Run(current);

            IReadOnlyList<string> problems = machine.Audit();
            if (problems.Count > 0)
                Assert.Fail($"step {step} ({action.Name} on {sp.Process}): Audit found {string.Join("; ", problems.Take(5))}");
        }

        // Every byte of every process, one last time.
        foreach (ShadowProcess sp in procs)
            Assert.That(sp.CompareAll(), Is.Null, "every byte of every readable page");
        foreach (ShadowProcess sp in procs)
            sp.Process.Exit();
        Assert.That(machine.Audit(), Is.Empty);
        Assert.That(machine.GetStats().AllFreePages, Is.EqualTo(initialFree + (machine.ZeroPagePfnIfAllocated >= 0 ? -1 : 0)),
            "after every exit, every frame but the zero page is free");
        Assert.That(ran.Where(r => r.Value == 0).Select(r => r.Key), Is.Empty, "every operation ran");
        TestContext.Out.WriteLine($"seed {seed}: {string.Join(", ", ran.Select(r => $"{r.Key} {r.Value}"))}");
    }

    /// <summary>The first action whose band <paramref name="draw"/> falls below and that can run now, or null.</summary>
    private static ModelAction? Choose(int draw, ModelStep step)
    {
        int bandEnd = 0;
        foreach (ModelAction action in Actions)
        {
            bandEnd += action.Percent;
            if (draw < bandEnd && action.CanRun(step))
                return action;
        }
        return null;
    }

    private static bool HasPages(ModelStep s) => s.Shadow.Pages.Count > 0;

    private static void Mmap(ModelStep s)
    {
        (Random random, int step, ShadowProcess sp, VmProcess p) = (s.Random, s.Index, s.Shadow, s.Process);
        ulong pages = (ulong)random.Next(1, 24);
        bool shared = random.Next(4) == 0;
        bool fixedAt = random.Next(3) == 0;
        ulong address = fixedAt ? Window + (ulong)random.Next(0, 512 - (int)pages) * Page : 0;
        Protection prot = random.Next(5) == 0 ? Protection.Read : Protection.ReadWrite;
        MapFlags flags = (shared ? MapFlags.Shared : MapFlags.Private) | (fixedAt ? MapFlags.Fixed : 0);
        Errno result = p.Mmap(address, pages * Page, prot, flags, out ulong mapped);
        Assert.That(result, Is.EqualTo(Errno.None), $"step {step}: mmap");
        if (fixedAt)
            Assert.That(mapped, Is.EqualTo(address));
        for (ulong i = 0; i < pages; i++)
            Assert.That(fixedAt || !sp.Pages.ContainsKey(mapped + i * Page), Is.True, $"step {step}: mmap reused a mapped address");
        sp.Map(mapped, pages * Page, prot, shared);
    }

    private static void Munmap(ModelStep s)
    {
        (ulong start, ulong length) = RandomRange(s.Random, s.Shadow);
        bool beyondUserSpace = start + length > 0x7FFF_FFFF_F000UL;
        Assert.That(s.Process.Munmap(start, length), Is.EqualTo(beyondUserSpace ? Errno.EINVAL : Errno.None), $"step {s.Index}: munmap");
        if (!beyondUserSpace)
            s.Shadow.Unmap(start, length);
    }

    private static void Mprotect(ModelStep s)
    {
        (ulong start, ulong length) = RandomRange(s.Random, s.Shadow);
        Protection prot = s.Random.Next(3) switch { 0 => Protection.None, 1 => Protection.Read, _ => Protection.ReadWrite };
        Errno expected = s.Shadow.Protect(start, length, prot);
        Assert.That(s.Process.Mprotect(start, length, prot), Is.EqualTo(expected), $"step {s.Index}: mprotect");
    }

    private static void DontNeed(ModelStep s)
    {
        (ulong start, ulong length) = RandomRange(s.Random, s.Shadow);
        Errno expected = s.Shadow.DontNeed(start, length);
        Assert.That(s.Process.Madvise(start, length, Advice.DontNeed), Is.EqualTo(expected), $"step {s.Index}: madvise(DONTNEED)");
    }

    private static void Write(ModelStep s)
    {
        (Random random, int step, ShadowProcess sp, VmProcess p) = (s.Random, s.Index, s.Shadow, s.Process);
        ulong start = RandomMappedAddress(random, sp) + (ulong)random.Next(0, (int)Page);
        int length = random.Next(1, 3 * (int)Page);
        byte[] data = new byte[length];
        random.NextBytes(data);
        ulong? faultAt = sp.FirstFault(start, (ulong)length, write: true);
        try
        {
            p.Write(start, data);
            Assert.That(faultAt, Is.Null, $"step {step}: the write should have faulted");
        }
        catch (SegmentationFault fault)
        {
            Assert.That(fault.Address, Is.EqualTo(faultAt), $"step {step}: faulting address");
            Assert.That(fault.Kind, Is.EqualTo(AccessKind.Write));
        }
        sp.Store(start, data, faultAt ?? start + (ulong)length);
    }

    private static void Read(ModelStep s)
    {
        (Random random, int step, ShadowProcess sp, VmProcess p) = (s.Random, s.Index, s.Shadow, s.Process);
        ulong start = RandomMappedAddress(random, sp) + (ulong)random.Next(0, (int)Page);
        int length = random.Next(1, 2 * (int)Page);
        byte[] data = new byte[length];
        ulong? faultAt = sp.FirstFault(start, (ulong)length, write: false);
        try
        {
            p.Read(start, data);
            Assert.That(faultAt, Is.Null, $"step {step}: the read should have faulted");
        }
        catch (SegmentationFault fault)
        {
            Assert.That(fault.Address, Is.EqualTo(faultAt), $"step {step}: faulting address");
        }
        if (sp.Compare(start, data, faultAt ?? start + (ulong)length) is { } difference)
            Assert.Fail($"step {step}: {difference}");
    }

    private static void Fork(ModelStep s) => s.Processes.Add(s.Shadow.Fork(s.Process.Fork()));

    private static void Exit(ModelStep s)
    {
        s.Process.Exit();
        s.Processes.Remove(s.Shadow);
    }

    private static ulong RandomMappedAddress(Random random, ShadowProcess sp) => sp.Pages.Keys.ElementAt(random.Next(sp.Pages.Count));

    private static (ulong Start, ulong Length) RandomRange(Random random, ShadowProcess sp)
    {
        ulong start = RandomMappedAddress(random, sp) - (ulong)random.Next(0, 3) * Page;
        return (start, (ulong)random.Next(1, 12) * Page);
    }

    /// <summary>One kind of step of the model.</summary>
    /// <param name="Name">What the step does, as failure messages name it.</param>
    /// <param name="Percent">Its band of the draw in [0, 100).</param>
    /// <param name="CanRun">Whether it may run on this step's process now.</param>
    /// <param name="Run">Does it on the machine and on the shadow, asserting that they agree.</param>
    private sealed record ModelAction(string Name, int Percent, Func<ModelStep, bool> CanRun, Action<ModelStep> Run);

    /// <summary>What one step works on.</summary>
    /// <param name="Random">The test's seeded random source (every draw comes from it, in a fixed order).</param>
    /// <param name="Index">The step's number, for failure messages.</param>
    /// <param name="Processes">Every live process and its shadow.</param>
    /// <param name="Shadow">The process this step acts on, with its shadow.</param>
    private sealed record ModelStep(Random Random, int Index, List<ShadowProcess> Processes, ShadowProcess Shadow)
    {
        public VmProcess Process => Shadow.Process;
    }
}
