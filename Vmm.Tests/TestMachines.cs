using Vmm.Mm;

namespace Vmm.Tests;

/// <summary>
/// The one place tests get a machine from: named machine shapes, a fresh machine per call, a machine
/// with one process and a mapped region, and the audit every test ends with.
/// </summary>
/// <remarks>
/// Every call builds a new machine: no test shares one with another, so each test starts from the same
/// state and stays deterministic whatever order NUnit runs them in. The shapes are
/// <see cref="MachineOptions"/> records, so a test that needs one knob more writes
/// <c>TestMachines.Create(TestMachines.TwoNodes with { PoisonFreedFrames = true })</c>. Helpers of one
/// mechanism (KSM's patterned mappings in <c>Ksm/KsmTestKit.cs</c>, the shadow oracle in
/// <c>Robustness/ShadowMemory.cs</c>) build on these instead of making their own machines.
/// </remarks>
internal static class TestMachines
{
    /// <summary>What <see cref="AssertAuditClean"/> says when it fails, unless the test says more.</summary>
    public const string AuditBecause = "Audit recounts everything from the page tables";

    /// <summary><see cref="MachineOptions.Small"/>: 2 nodes of 4 MiB in 2 MiB blocks, no watermark reserve.</summary>
    public static MachineOptions Small => MachineOptions.Small;

    /// <summary>2 nodes of 16 MiB in 8 MiB blocks (two blocks a node), no watermark reserve.</summary>
    public static MachineOptions TwoNodes => new() { NodeCount = 2, NodeSizeBytes = 16L << 20, BlockSizeBytes = 8L << 20, MinFreeKbytes = 0 };

    /// <summary>2 nodes of 32 MiB in 8 MiB blocks, no watermark reserve: room for KSM's stable and unstable trees.</summary>
    public static MachineOptions TwoLargeNodes => new() { NodeCount = 2, NodeSizeBytes = 32L << 20, BlockSizeBytes = 8L << 20, MinFreeKbytes = 0 };

    /// <summary><see cref="Small"/> with 4 nodes: 4 nodes of 4 MiB in 2 MiB blocks, no watermark reserve.</summary>
    public static MachineOptions FourSmallNodes => Small with { NodeCount = 4 };

    /// <summary>1 node of 16 MiB in 8 MiB blocks, no watermark reserve: whole free pageblocks on one node.</summary>
    public static MachineOptions OneNode => new() { NodeCount = 1, NodeSizeBytes = 16L << 20, BlockSizeBytes = 8L << 20, MinFreeKbytes = 0 };

    /// <summary>A fresh machine of the given shape (<see cref="Small"/> by default). The caller disposes it.</summary>
    public static Machine Create(MachineOptions? options = null) => new(options ?? Small);

    /// <summary>A fresh <see cref="TwoLargeNodes"/> machine, with KSM (the default) or without it.</summary>
    public static Machine CreateForKsm(bool ksm = true) => Create(TwoLargeNodes with { EnableKsm = ksm });

    /// <summary>
    /// A fresh machine (<see cref="Small"/> by default) with one process and a private read-write mapping of
    /// <paramref name="bytes"/>; when <paramref name="fill"/> is given, every byte of it is written with
    /// that value (so every page is present). Dispose the result to dispose the machine.
    /// </summary>
    public static MachineWithRegion CreateWithRegion(ulong bytes, byte? fill = null, MachineOptions? options = null)
    {
        Machine machine = Create(options);
        try
        {
            VmProcess process = machine.CreateProcess();
            ulong va = process.Mmap(bytes);
            if (fill is byte value)
                process.Fill(va, bytes, value);
            return new MachineWithRegion(machine, process, va, bytes);
        }
        catch
        {
            machine.Dispose();
            throw;
        }
    }

    /// <summary>Asserts that <see cref="Machine.Audit"/> finds nothing wrong.</summary>
    public static void AssertAuditClean(Machine machine, string because = AuditBecause) =>
        Assert.That(machine.Audit(), Is.Empty, because);
}

/// <summary>A machine with one process and one mapped region, from <see cref="TestMachines.CreateWithRegion"/>.</summary>
/// <param name="Machine">The machine; disposed with this object.</param>
/// <param name="Process">The process that maps the region.</param>
/// <param name="Va">The region's first address.</param>
/// <param name="Bytes">The region's length.</param>
internal sealed record MachineWithRegion(Machine Machine, VmProcess Process, ulong Va, ulong Bytes) : IDisposable
{
    /// <summary>Asserts that the machine's audit finds nothing wrong.</summary>
    public void AssertAuditClean(string because = TestMachines.AuditBecause) => TestMachines.AssertAuditClean(Machine, because);

    /// <summary>Disposes the machine.</summary>
    public void Dispose() => Machine.Dispose();
}
