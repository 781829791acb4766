using System.Net.Sockets;

namespace Vmm.Cli.Tests;

/// <summary>
/// `vmm dedupe` on what is not a regular file: FIFOs, devices and sockets are skipped with a warning
/// and never opened (opening a FIFO used to hang the command), missing paths are reported, and the
/// rest is processed. A path named on the command line that could not be used makes the exit code 2;
/// what is skipped inside a directory only warns.
/// </summary>
[TestFixture]
[Platform("Linux", Reason = "FIFOs, /dev/zero and Unix sockets")]
[Category("Smoke")]
public sealed class DedupeInputTests
{
    private string _dir = null!;
    private string _data = null!;

    [SetUp]
    public void SetUp()
    {
        _dir = Directory.CreateTempSubdirectory("vmm-cli-").FullName;
        _data = Path.Combine(_dir, "data");
        Directory.CreateDirectory(_data);
        // Two copies of the same 64 KiB: something to merge, so the report has content.
        byte[] bytes = new byte[64 << 10];
        new Random(9).NextBytes(bytes);
        File.WriteAllBytes(Path.Combine(_data, "a.bin"), bytes);
        File.WriteAllBytes(Path.Combine(_data, "b.bin"), bytes);
    }

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    private static VmmResult Dedupe(params string[] paths) => VmmRun.Run(["dedupe", "--block-size-mib", "2", .. paths]);

    [Test]
    public void A_fifo_named_directly_is_skipped_with_a_warning_instead_of_hanging()
    {
        string fifo = Path.Combine(_dir, "pipe");
        VmmRun.MakeFifo(fifo);

        VmmResult result = VmmRun.Run(["dedupe", "--block-size-mib", "2", fifo, _data],
            onTimeout: () => { using var unblock = new FileStream(fifo, FileMode.Open, FileAccess.Write); });

        Assert.That(result.ExitCode, Is.Not.Null, $"dedupe must not block opening a FIFO; {result}");
        Assert.That(result.Output, Does.Contain($"{fifo}: a FIFO, skipped"), result.ToString());
        Assert.That(result.Output, Does.Match(@"files\s*│\s*2\b"), $"the other paths are still processed; {result}");
        Assert.That(result.ExitCode, Is.EqualTo(2), $"a named path that could not be used is a bad argument; {result}");
    }

    [Test]
    public void A_fifo_met_in_a_directory_walk_is_skipped_with_a_warning_and_the_run_succeeds()
    {
        string fifo = Path.Combine(_data, "pipe");
        VmmRun.MakeFifo(fifo);

        VmmResult result = VmmRun.Run(["dedupe", "--block-size-mib", "2", _data],
            onTimeout: () => { using var unblock = new FileStream(fifo, FileMode.Open, FileAccess.Write); });

        Assert.That(result.ExitCode, Is.EqualTo(0), $"what is skipped inside a directory only warns; {result}");
        Assert.That(result.Output, Does.Contain($"skipped {fifo}: a FIFO"), result.ToString());
        Assert.That(result.Output, Does.Match(@"files\s*│\s*2\b"), result.ToString());
    }

    [Test]
    public void Character_devices_named_directly_are_skipped_and_never_read()
    {
        VmmResult result = Dedupe("/dev/zero", "/dev/null", _data);

        Assert.That(result.ExitCode, Is.EqualTo(2), $"reading /dev/zero would never end; {result}");
        Assert.That(result.Output, Does.Contain("/dev/zero: a character device, skipped"), result.ToString());
        Assert.That(result.Output, Does.Contain("/dev/null: a character device, skipped"), result.ToString());
        Assert.That(result.Output, Does.Match(@"files\s*│\s*2\b"), result.ToString());
    }

    [Test]
    public void A_link_to_a_device_inside_a_directory_is_not_followed()
    {
        File.CreateSymbolicLink(Path.Combine(_data, "zero"), "/dev/zero");

        VmmResult result = Dedupe(_data);

        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        Assert.That(result.Output, Does.Match(@"files\s*│\s*2\b"), result.ToString());
    }

    [Test]
    public void A_unix_socket_is_skipped_whether_named_or_met_in_a_directory()
    {
        string named = Path.Combine(_dir, "named.sock");
        string inside = Path.Combine(_data, "inside.sock");
        using var a = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        using var b = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        a.Bind(new UnixDomainSocketEndPoint(named));
        b.Bind(new UnixDomainSocketEndPoint(inside));

        VmmResult result = Dedupe(named, _data);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain($"{named}: a socket, skipped"), result.ToString());
        Assert.That(result.Output, Does.Contain($"skipped {inside}: a socket"), result.ToString());
        Assert.That(result.Output, Does.Match(@"files\s*│\s*2\b"), result.ToString());
    }

    [Test]
    public void A_missing_path_is_reported_and_the_rest_is_processed()
    {
        // Tests run as root, for whom permissions do not stop a read: a path that does not exist stands
        // for every path that cannot be opened (the same code reports EACCES).
        string missing = Path.Combine(_dir, "no-such-file");

        VmmResult result = Dedupe(missing, _data);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain($"cannot use {missing}: No such file or directory"), result.ToString());
        Assert.That(result.Output, Does.Match(@"files\s*│\s*2\b"), result.ToString());
        Assert.That(result.Output, Does.Not.Contain("internal error"), result.ToString());
    }

    [Test]
    public void An_empty_path_is_reported_not_an_internal_error()
    {
        VmmResult result = Dedupe("", _data);

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain("an empty path"), result.ToString());
        Assert.That(result.Output, Does.Match(@"files\s*│\s*2\b"), result.ToString());
    }

    [Test]
    public void Only_unusable_paths_is_a_bad_argument_before_any_machine_is_built()
    {
        VmmResult result = Dedupe(Path.Combine(_dir, "missing"), "/dev/zero");

        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Output, Does.Contain("no readable, non-empty regular files"), result.ToString());
        Assert.That(result.Output, Does.Not.Contain("vmm dedupe ─"), "no run started");
    }

    [Test]
    public void Files_with_duplicates_merge_and_the_run_exits_0()
    {
        VmmResult result = Dedupe(_data);

        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        Assert.That(result.Output, Does.Match(@"pages_sharing\s*│\s*16\b"), $"b.bin's 16 pages map a.bin's; {result}");
    }

    [Test]
    public void Double_dash_ends_the_options_so_a_path_may_start_with_a_dash()
    {
        VmmResult result = Dedupe("--", "-not-an-option", _data);

        Assert.That(result.Output, Does.Contain("cannot use -not-an-option: No such file or directory"), $"taken as a path; {result}");
        Assert.That(result.Output, Does.Not.Contain("unknown option"), result.ToString());
        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
    }
}
